"""Every faiss backend against the exact numpy reference on structured data (recall@10 reported)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvgl.bench.scale import recall_at_k, structured_dataset
from cvgl.index import backends
from cvgl.index.backends import (
    FAISS_BACKENDS,
    FlatBackend,
    IVFPQBackend,
    SQ8Backend,
    build_backend,
    choose_index_type,
)
from cvgl.index.vectors import VectorBackend, exact_top_k, rerank_exact

# Small IVF-PQ so a test builds in well under a second: 32 lists, 16 x 6-bit codes.
IVF = {"nlist": 32, "m": 16, "nbits": 6, "nprobe": 8}
FLOORS = {"flat": 1.0, "sq8": 0.95, "ivfpq": 0.95}


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    database, queries, _, _ = structured_dataset(4000, queries=60, dim=64, clusters=40)
    return database, queries


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def _build(kind: str, database: np.ndarray, **params):
    return build_backend(kind, database, **({**IVF, **params} if kind == "ivfpq" else params))


@pytest.mark.parametrize("kind", ["flat", "sq8", "ivfpq"])
def test_recall_at_10_against_numpy_reference(data, kind: str) -> None:
    database, queries = data
    backend = _build(kind, database)
    assert isinstance(backend, VectorBackend) and len(backend) == len(database)
    scores, rows = backend.search(queries, 10)
    exact_scores, exact_rows = exact_top_k(queries, database, 10)
    recall = recall_at_k(rows, exact_rows)
    print(f"\n{kind}: recall@10 vs exact numpy = {recall:.3f} ({backend.describe()})")
    assert recall >= FLOORS[kind]
    assert rows.dtype == np.int64 and rows.shape == (len(queries), 10)
    # whatever is returned carries its exact score (flat) or its re-ranked exact score (sq8/ivfpq)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, database[rows]), atol=1e-4)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    if kind == "flat":
        np.testing.assert_array_equal(rows, exact_rows)
        np.testing.assert_allclose(scores, exact_scores, atol=1e-5)


@pytest.mark.parametrize("kind", ["sq8", "ivfpq"])
def test_rerank_is_what_lifts_recall(data, kind: str) -> None:
    database, queries = data
    _, exact_rows = exact_top_k(queries, database, 10)
    with_rerank = recall_at_k(_build(kind, database).search(queries, 10)[1], exact_rows)
    without = recall_at_k(_build(kind, database, rerank=1).search(queries, 10)[1], exact_rows)
    print(f"\n{kind}: recall@10 {without:.3f} without re-rank, {with_rerank:.3f} with")
    assert with_rerank >= without


@pytest.mark.parametrize("kind", ["flat", "sq8", "ivfpq"])
@pytest.mark.parametrize("subset_path", ["exact", "selector"])
def test_allowed_rows_match_numpy_reference(data, kind: str, subset_path: str, monkeypatch) -> None:
    """A filter returns only allowed rows; the small-subset path and flat's selector are exact."""
    database, queries = data
    if subset_path == "selector":
        monkeypatch.setattr(backends, "EXACT_SUBSET_MAX", 0)
    allowed = np.random.default_rng(3).choice(len(database), size=700, replace=False)
    backend = _build(kind, database)
    _, rows = backend.search(queries, 10, allowed=allowed)
    _, expected = exact_top_k(queries, database[np.sort(allowed)], 10, np.sort(allowed))
    assert np.isin(rows[rows >= 0], allowed).all()
    recall = recall_at_k(rows, expected)
    print(f"\n{kind} ({subset_path}): recall@10 within 700 allowed rows = {recall:.3f}")
    if subset_path == "exact" or kind == "flat":
        np.testing.assert_array_equal(rows, expected)
    else:
        assert recall >= 0.8


@pytest.mark.parametrize("kind", ["flat", "sq8", "ivfpq"])
def test_fewer_rows_than_k_are_padded(data, kind: str) -> None:
    database, queries = data
    scores, rows = _build(kind, database).search(queries[:2], 10, allowed=np.array([5, 7, 7, 11]))
    assert rows.shape == (2, 10)
    assert set(rows[:, :3].ravel()) == {5, 7, 11}
    assert (rows[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    scores, rows = _build(kind, database).search(queries[:2], 4, allowed=np.array([], dtype=np.int64))
    assert (rows == -1).all()


@pytest.mark.parametrize("kind", ["flat", "sq8", "ivfpq"])
@pytest.mark.parametrize("mmap", [False, True])
def test_save_and_open_answer_identically(data, tmp_path: Path, kind: str, mmap: bool) -> None:
    database, queries = data
    built = _build(kind, database)
    built.save(tmp_path)
    opened = FAISS_BACKENDS[kind].open(tmp_path, mmap=mmap, params=built.params, vectors=lambda r: database[r])
    assert len(opened) == len(built) and opened.describe() == built.describe()
    for a, b in zip(built.search(queries, 10), opened.search(queries, 10)):
        np.testing.assert_array_equal(a, b)


def test_auto_picks_by_size() -> None:
    assert choose_index_type(10) == "flat"
    assert choose_index_type(backends.FLAT_MAX - 1) == "flat"
    assert choose_index_type(backends.FLAT_MAX) == "sq8"
    assert choose_index_type(backends.SQ8_MAX) == "sq8"
    assert choose_index_type(backends.SQ8_MAX + 1) == "ivfpq"
    assert isinstance(build_backend("auto", np.eye(8, dtype=np.float32)), FlatBackend)
    assert FAISS_BACKENDS == {"flat": FlatBackend, "sq8": SQ8Backend, "ivfpq": IVFPQBackend}
    with pytest.raises(ValueError, match="unknown index type"):
        build_backend("hnsw", np.eye(8, dtype=np.float32))


def test_ivfpq_parameters_follow_size() -> None:
    params = backends.ivfpq_params(1_000_000, 384)
    assert params["nlist"] == 4000 and params["m"] == 48 and params["nbits"] == 8
    small = backends.ivfpq_params(2000, 96)
    assert small["nlist"] <= 2000 // 39 and 96 % small["m"] == 0 and small["nbits"] < 8
    with pytest.raises(ValueError, match="divide"):
        backends.ivfpq_params(1000, 30, m=7)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 30), st.integers(1, 12), st.integers(0, 10_000))
def test_rerank_exact_equals_numpy_top_k_over_candidates(q: int, c: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((40, 6)).astype(np.float32)
    queries = rng.standard_normal((q, 6)).astype(np.float32)
    candidates = np.stack([rng.permutation(40)[:c] for _ in range(q)])  # faiss never repeats a row
    candidates[rng.random((q, c)) < 0.2] = -1
    scores, rows = rerank_exact(queries, candidates, lambda r: vectors[r], k)
    for i in range(q):
        pool = np.unique(candidates[i][candidates[i] >= 0])
        want_scores, want_rows = exact_top_k(queries[i : i + 1], vectors[pool], k, pool)
        np.testing.assert_allclose(scores[i], want_scores[0], atol=1e-5)
        assert set(rows[i][rows[i] >= 0]) == set(want_rows[0][want_rows[0] >= 0])
