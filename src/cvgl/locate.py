"""``cvgl locate``: photos -> answers against a reference index, stage by stage.

:mod:`cvgl.preprocess` (photo -> hypotheses in the reference's geometry) -> the encoder ->
:mod:`cvgl.alignment` -> :mod:`cvgl.index.search` (per-tile scores) -> :mod:`cvgl.answer`.
This module only orchestrates: options, the two passes, and per-photo failures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cvgl.alignment import Alignment
from cvgl.answer import Answer, Skipped, answer_from_scores
from cvgl.errors import CvglError, InputError
from cvgl.index.search import hypothesis_scores
from cvgl.index.store import RERANK_POOL, ReferenceIndex
from cvgl.models.encoder import Encoder
from cvgl.preprocess import PreparedQuery, QueryOptions, prepare_query


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


def locate_images(
    paths: list[Path], encoder: Encoder, index: ReferenceIndex, options: LocateOptions, progress: bool = True
) -> tuple[list[Answer | Skipped], list[np.ndarray | None], list[PreparedQuery | None]]:
    """Locate each photo; a bad photo becomes a :class:`Skipped` and the batch goes on.

    Photos are independent: nothing is fitted on the batch (a photo gets the same answer alone
    or among others). Returns the answers, each photo's per-tile scores and its hypotheses.
    """
    from tqdm import tqdm

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

    results: list[Answer | Skipped] = []
    all_scores: list[np.ndarray | None] = []
    for i, (query, desc) in enumerate(zip(prepared, descriptors)):
        if query is None or desc is None:
            results.append(Skipped(str(paths[i]), errors[i]))
            all_scores.append(None)
            continue
        try:
            tile_scores, best_hyp = hypothesis_scores(index, desc, alignment, prior, options.candidates)
            results.append(answer_from_scores(query, tile_scores, best_hyp, index, options.top_k, options.temperature, describe(alignment)))
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001
            results.append(Skipped(str(paths[i]), one_line_reason(Path(paths[i]), exc)))
            all_scores.append(None)
            continue
        all_scores.append(tile_scores)
    return results, all_scores, prepared


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
