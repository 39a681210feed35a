"""The search vocabulary every vector backend shares, and the one exact re-rank.

Every backend answers ``search(queries, k, allowed=None, geo=None)`` with ``(scores [Q, k],
rows [Q, k])`` where rows are int64 row numbers of ``tiles.parquet`` (``-1`` with score ``-inf``
when fewer than ``k`` rows qualify). Queries and stored vectors are *aligned* and L2-normalised,
so the score is a cosine similarity.

"Candidates, then exact re-rank" is one function here (:func:`rerank_exact`): a compressed
backend (SQ8, IVF-PQ) proposes candidates and re-scores them against the exact vectors, and the
store re-scores a backend's candidates under another alignment with the same call.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

# rows -> their aligned float32 vectors; lets a backend or the store re-rank against raw.npy without a copy
RowVectors = Callable[[np.ndarray], np.ndarray]


@runtime_checkable
class VectorBackend(Protocol):
    """What the store and ``locate`` need from an index of aligned reference vectors."""

    kind: str
    native_geo: bool  # True: search() takes geo=(lat, lon, radius_m) itself

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               geo: tuple[float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]: ...

    def __len__(self) -> int: ...

    def describe(self) -> dict: ...

    def save(self, folder: Path) -> None: ...


def pad_results(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Shape ``[Q, k]``: missing rows are -1 with score -inf (faiss's own fillers normalised)."""
    q = len(rows)
    out_s = np.full((q, k), -np.inf, dtype=np.float32)
    out_r = np.full((q, k), -1, dtype=np.int64)
    width = min(k, rows.shape[1]) if rows.ndim == 2 else 0
    out_s[:, :width] = scores[:, :width]
    out_r[:, :width] = rows[:, :width]
    out_s[out_r < 0] = -np.inf
    return out_s, out_r


def no_results(n_queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` padding columns (-inf, -1) for every query: nothing qualified."""
    return pad_results(np.zeros((n_queries, 0), np.float32), np.zeros((n_queries, 0), np.int64), k)


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int, rows: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Plain numpy top-k by inner product (ties: lower row first); ``rows`` names the vectors."""
    scores = queries @ vectors.T
    k_eff = min(k, scores.shape[1])
    if k_eff == 0:
        return no_results(len(queries), k)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k_eff]
    top = np.take_along_axis(scores, order, axis=1)
    ids = order if rows is None else np.asarray(rows, dtype=np.int64)[order]
    return pad_results(top.astype(np.float32), ids.astype(np.int64), k)


def rerank_exact(queries: np.ndarray, candidates: np.ndarray, vectors: RowVectors, k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of each query's candidate rows (``-1`` = none) -> top ``k``.

    The union of all candidates is fetched once in ascending row order (sequential reads of a
    memory-mapped raw.npy)."""
    valid = candidates >= 0
    union = np.unique(candidates[valid])
    if len(union) == 0:
        return no_results(len(queries), k)
    table = np.asarray(vectors(union), dtype=np.float32)
    position = np.searchsorted(union, np.where(valid, candidates, union[0]))
    scores = np.einsum("qd,qcd->qc", queries, table[position])
    scores[~valid] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return pad_results(np.take_along_axis(scores, order, 1), np.where(
        np.take_along_axis(valid, order, 1), np.take_along_axis(candidates, order, 1), -1), k)
