"""Scoring a photo's hypotheses against an index: per tile, the best hypothesis and its score.

Scoring every tile (``ReferenceIndex.exact_scores``, dense ``[H, N]``) is exact and is what a
small flat index uses (at most ``DENSE_MAX`` tiles). Larger or non-flat indexes (SQ8, IVF-PQ,
Qdrant) are searched instead: each hypothesis asks the backend for its ``candidates`` best
tiles under the *stored* alignment, and the union of candidates is re-scored exactly against
raw.npy — with the caller's alignment when there is one, so for these indexes that alignment
applies to re-ranking the top candidates only. Tiles outside the pool get score ``-inf``. A
geographic prior (``allowed`` rows) keeps only tiles within the radius, in both paths.
"""

from __future__ import annotations

import numpy as np

from cvgl.alignment import Alignment
from cvgl.index.backends import FLAT_MAX
from cvgl.index.store import RERANK_POOL, ReferenceIndex

DENSE_MAX = FLAT_MAX  # flat indexes up to this many tiles are scored densely (exact)


def ranked_tiles(tile_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray | slice]:
    """(scored tiles best first, which tiles are scored) for per-tile scores.

    A searched index or a geographic prior leaves unscored tiles at -inf: they are never ranked,
    and only the finite scores are sorted (ties keep tile order), not all N tiles. The second
    value indexes the scored tiles (``slice(None)`` when every tile is scored).
    """
    finite = np.isfinite(tile_scores)
    scored = slice(None) if finite.all() else np.flatnonzero(finite)
    rows = np.arange(len(tile_scores))[scored]
    return rows[np.argsort(-tile_scores[scored], kind="stable")], scored


def best_over_hypotheses(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile best score over hypotheses ``[H, N]``, and which hypothesis gave it."""
    return scores.max(0), scores.argmax(0)


def dense_scoring(index: ReferenceIndex) -> bool:
    """Score every tile (exact, as for the demo) or search the backend (see module doc)."""
    return index.index_type == "flat" and len(index) <= DENSE_MAX


def hypothesis_score_matrix(
    index: ReferenceIndex, desc: np.ndarray, alignment: Alignment,
    prior: tuple[np.ndarray | None, tuple | None] | None = None, candidates: int = RERANK_POOL,
) -> np.ndarray:
    """Score of every hypothesis for every tile ``[H, N]`` (``-inf`` = not scored): dense for
    small flat indexes, else the union of the backend's candidates re-scored exactly.

    ``prior``: a geographic prior in the backend's terms (:meth:`ReferenceIndex.prior`,
    computed once by callers that score many photos); None: every tile."""
    prior = prior if prior is not None else (None, None)
    if dense_scoring(index):
        scores = index.exact_scores(desc, None, alignment)
        allowed = prior[0]  # a flat index filters by rows
        if allowed is not None:
            masked = np.full_like(scores, -np.inf)
            masked[:, allowed] = scores[:, allowed]
            scores = masked
        return scores
    _, rows = index.candidates(desc, candidates, prior)
    pool = np.unique(rows[rows >= 0])
    scores = np.full((len(desc), len(index)), -np.inf, dtype=np.float32)
    scores[:, pool] = index.exact_scores(desc, pool, alignment)
    return scores


def hypothesis_scores(
    index: ReferenceIndex, desc: np.ndarray, alignment: Alignment,
    prior: tuple[np.ndarray | None, tuple | None] | None = None, candidates: int = RERANK_POOL,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile best score over a photo's hypotheses ``[N]`` (``-inf`` = not scored) and which
    hypothesis gave it (see :func:`hypothesis_score_matrix`)."""
    return best_over_hypotheses(hypothesis_score_matrix(index, desc, alignment, prior, candidates))
