"""Query/reference alignments: what each kind recovers, on synthetic descriptors with a known answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvgl.alignment import (
    KINDS,
    Alignment,
    fit_alignment,
    l2n,
    mutual_nearest_neighbours,
    procrustes_rotation,
)

DIM = 16


def random_rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))  # Haar-distributed orthogonal


def small_rotation(dim: int, angle: float, rng: np.random.Generator) -> np.ndarray:
    """exp(A) for a random skew-symmetric A of spectral size ~angle: a rotation near identity."""
    a = rng.normal(size=(dim, dim))
    a = (a - a.T) / 2
    a *= angle / np.abs(np.linalg.eigvals(a)).max()
    values, vectors = np.linalg.eig(a)
    return np.real(vectors @ np.diag(np.exp(values)) @ np.linalg.inv(vectors))


def recall_at_1(queries: np.ndarray, reference: np.ndarray, truth: np.ndarray) -> float:
    return float(((queries @ reference.T).argmax(1) == truth).mean())


def gallery(n: int, rng: np.random.Generator, dim: int = DIM) -> np.ndarray:
    """Anisotropic descriptors with an offset, like real ones (not centred, not white)."""
    scales = np.linspace(0.5, 3.0, dim)
    return rng.normal(size=(n, dim)) * scales + rng.normal(size=dim)


def _fit_any(kind: str, rng: np.random.Generator) -> Alignment:
    reference = gallery(200, rng)
    queries = reference @ random_rotation(DIM, rng) + 0.5
    return fit_alignment(kind, reference, queries=queries, anchors=(queries[:100], reference[:100]))


# ------------------------------------------------------------------------------ every kind


@pytest.mark.parametrize("kind", KINDS)
def test_apply_gives_unit_vectors(kind: str) -> None:
    rng = np.random.default_rng(0)
    alignment = _fit_any(kind, rng)
    for view in ("query", "reference"):
        out = alignment.apply(gallery(50, rng), view)
        assert out.dtype == np.float32
        assert out.shape == (50, DIM)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="view"):
        alignment.apply(gallery(2, rng), "aerial")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("leaky", [False, True])
def test_save_load_round_trip(tmp_path: Path, kind: str, leaky: bool) -> None:
    rng = np.random.default_rng(1)
    reference = gallery(120, rng)
    queries = gallery(80, rng) @ random_rotation(DIM, rng)
    alignment = fit_alignment(kind, reference, queries=queries, anchors=(queries[:60], reference[:60]), leaky=leaky)
    path = tmp_path / "alignment.npz"
    alignment.save(path)
    loaded = Alignment.load(path)
    assert loaded.kind == kind
    assert loaded.fitted_on == alignment.fitted_on
    assert loaded.describe() == alignment.describe()
    assert loaded.leaky is leaky
    for name in ("query_mean", "query_matrix", "reference_mean", "reference_matrix"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(alignment, name))
    x = gallery(10, rng)
    np.testing.assert_array_equal(loaded.apply(x, "query"), alignment.apply(x, "query"))
    np.testing.assert_array_equal(loaded.apply(x, "reference"), alignment.apply(x, "reference"))


# ------------------------------------------------------------------------------ none / center


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_none_preserves_cosine_ranking(seed: int) -> None:
    rng = np.random.default_rng(seed)
    reference = gallery(40, rng)
    queries = gallery(7, rng)
    alignment = fit_alignment("none", reference)
    aligned = alignment.apply(queries, "query") @ alignment.apply(reference, "reference").T
    cosine = l2n(queries) @ l2n(reference).T
    np.testing.assert_allclose(aligned, cosine, atol=1e-5)
    np.testing.assert_array_equal(aligned.argmax(1), cosine.argmax(1))
    assert alignment.describe() == {"kind": "none", "reference": 40, "unlabelled_queries": 0, "anchor_pairs": 0, "leaky": False}


def test_center_removes_each_view_mean() -> None:
    rng = np.random.default_rng(2)
    reference = gallery(300, rng)
    queries = gallery(300, rng) + 5.0
    alignment = fit_alignment("center", reference, queries=queries)
    np.testing.assert_allclose(alignment.reference_mean, reference.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(alignment.query_mean, queries.mean(0), rtol=1e-5, atol=1e-5)
    assert alignment.fitted_on["unlabelled_queries"] == 300
    without = fit_alignment("center", reference)
    np.testing.assert_allclose(without.query_mean, without.reference_mean)
    assert without.fitted_on["unlabelled_queries"] == 0


# ------------------------------------------------------------------------------ procrustes


def test_procrustes_rotation_solves_orthogonal_problem() -> None:
    rng = np.random.default_rng(3)
    source = rng.normal(size=(100, DIM))
    rotation = random_rotation(DIM, rng)
    found = procrustes_rotation(source, source @ rotation)
    np.testing.assert_allclose(found, rotation, atol=1e-5)
    np.testing.assert_allclose(found @ found.T, np.eye(DIM), atol=1e-5)


@pytest.mark.parametrize("leaky", [False, True])
def test_procrustes_recovers_known_rotation(leaky: bool) -> None:
    rng = np.random.default_rng(4)
    reference = gallery(300, rng)
    rotation = random_rotation(DIM, rng)
    queries = reference @ rotation + rng.normal(scale=0.05, size=reference.shape)
    truth = np.arange(len(reference))
    baseline = fit_alignment("none", reference)
    before = recall_at_1(baseline.apply(queries, "query"), baseline.apply(reference, "reference"), truth)
    assert before < 0.2  # the rotation really scrambles the matches

    alignment = fit_alignment("procrustes", reference, anchors=(queries, reference), leaky=leaky)
    after = recall_at_1(alignment.apply(queries, "query"), alignment.apply(reference, "reference"), truth)
    assert after == 1.0
    np.testing.assert_allclose(alignment.query_matrix, rotation.T, atol=0.02)
    assert alignment.fitted_on["anchor_pairs"] == 300
    assert alignment.leaky is leaky
    assert alignment.describe()["leaky"] is leaky


def test_procrustes_from_a_train_split_generalises() -> None:
    rng = np.random.default_rng(5)
    reference = gallery(400, rng)
    rotation = random_rotation(DIM, rng)
    queries = reference @ rotation + rng.normal(scale=0.05, size=reference.shape)
    train, test = slice(0, 200), slice(200, 400)
    alignment = fit_alignment("procrustes", reference[test], anchors=(queries[train], reference[train]))
    truth = np.arange(200)
    assert recall_at_1(alignment.apply(queries[test], "query"), alignment.apply(reference[test], "reference"), truth) == 1.0
    assert not alignment.leaky


def test_procrustes_with_pca() -> None:
    rng = np.random.default_rng(6)
    reference = gallery(300, rng)
    queries = reference @ random_rotation(DIM, rng) + rng.normal(scale=0.05, size=reference.shape)
    alignment = fit_alignment("procrustes", reference, anchors=(queries, reference), pca_dim=12)
    assert alignment.fitted_on["pca_dim"] == 12
    assert alignment.query_matrix.shape == (DIM, 12)
    assert alignment.reference_matrix.shape == (DIM, 12)
    truth = np.arange(300)
    assert recall_at_1(alignment.apply(queries, "query"), alignment.apply(reference, "reference"), truth) > 0.95


# ------------------------------------------------------------------------------ mnn-procrustes


def test_mutual_nearest_neighbours_against_loops() -> None:
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(30, 5)), rng.normal(size=(25, 5))
    i, j = mutual_nearest_neighbours(a, b)
    sims = a @ b.T
    expected = [(r, int(np.argmax(sims[r]))) for r in range(30) if int(np.argmax(sims[:, int(np.argmax(sims[r]))])) == r]
    assert list(zip(i.tolist(), j.tolist())) == expected


def test_mnn_procrustes_recovers_small_rotation_without_labels() -> None:
    rng = np.random.default_rng(8)
    reference = gallery(400, rng)
    rotation = small_rotation(DIM, 1.2, rng)  # radians in its largest plane
    order = rng.permutation(len(reference))  # unlabelled: queries come in another order
    queries = (reference @ rotation + rng.normal(scale=0.05, size=reference.shape))[order]
    truth = order

    baseline = fit_alignment("none", reference)
    before = recall_at_1(baseline.apply(queries, "query"), baseline.apply(reference, "reference"), truth)
    assert before < 0.9, before  # the rotation is large enough to cost matches

    alignment = fit_alignment("mnn-procrustes", reference, queries=queries)
    after = recall_at_1(alignment.apply(queries, "query"), alignment.apply(reference, "reference"), truth)
    assert after == 1.0
    assert np.abs(alignment.query_matrix - rotation.T).max() < 0.05
    assert np.abs(np.eye(DIM) - rotation.T).max() > 0.2  # ... and identity would not have passed
    assert alignment.fitted_on["mnn_pairs"] > 200
    assert alignment.fitted_on["unlabelled_queries"] == 400
    assert alignment.fitted_on["anchor_pairs"] == 0


# ------------------------------------------------------------------------------ coral / pca-whiten


def test_coral_matches_covariances() -> None:
    rng = np.random.default_rng(9)
    reference = gallery(5000, rng)
    mixing = rng.normal(size=(DIM, DIM)) + 2 * np.eye(DIM)
    queries = rng.normal(size=(3000, DIM)) @ mixing + 3.0  # another covariance and mean
    c_r = np.cov(reference, rowvar=False)
    assert np.abs(np.cov(queries, rowvar=False) - c_r).max() > 1.0

    alignment = fit_alignment("coral", reference, queries=queries)
    mapped = (queries - alignment.query_mean) @ alignment.query_matrix  # before the final L2 norm
    np.testing.assert_allclose(mapped.mean(0), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.cov(mapped, rowvar=False), c_r, atol=0.02 * np.abs(c_r).max())
    np.testing.assert_array_equal(alignment.reference_matrix, np.eye(DIM, dtype=np.float32))
    assert alignment.fitted_on["unlabelled_queries"] == 3000


@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_pca_whiten_reference_is_white(eps: float) -> None:
    rng = np.random.default_rng(10)
    reference = gallery(2000, rng) @ random_rotation(DIM, rng)
    alignment = fit_alignment("pca-whiten", reference, eps=eps)
    assert alignment.fitted_on["pca_dim"] == DIM
    white = (reference - alignment.reference_mean) @ alignment.reference_matrix
    # eps is a ridge relative to the largest variance: (smallest var / largest) = 1/36 here
    np.testing.assert_allclose(np.cov(white, rowvar=False), np.eye(DIM), atol=max(1e-4, 40 * eps))
    np.testing.assert_array_equal(alignment.query_matrix, alignment.reference_matrix)


def test_pca_whiten_reduced_dim() -> None:
    rng = np.random.default_rng(11)
    reference = gallery(500, rng)
    alignment = fit_alignment("pca-whiten", reference, pca_dim=5, eps=1e-8)
    white = (reference - alignment.reference_mean) @ alignment.reference_matrix
    assert white.shape == (500, 5)
    np.testing.assert_allclose(np.cov(white, rowvar=False), np.eye(5), atol=1e-4)


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "kind, kwargs, match",
    [
        ("coral", {}, "coral needs"),
        ("coral", {"queries": np.zeros((1, DIM))}, "coral needs"),
        ("procrustes", {}, "procrustes needs"),
        ("procrustes", {"anchors": (np.zeros((5, DIM)), np.zeros((4, DIM)))}, "anchor shapes differ"),
        ("mnn-procrustes", {}, "mnn-procrustes needs"),
        ("mnn-procrustes", {"queries": np.zeros((0, DIM))}, "mnn-procrustes needs"),
        ("whitening", {}, "unknown alignment"),
    ],
)
def test_fit_alignment_missing_inputs(kind: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit_alignment(kind, gallery(20, np.random.default_rng(12)), **kwargs)
