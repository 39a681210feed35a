"""The scale benchmark's building blocks: structured data, the exact reference, the measurements."""

from __future__ import annotations

import numpy as np
import pytest

from cvgl.bench import run as bench_run
from cvgl.bench.scale import (
    Config,
    Growth,
    SpectralNoise,
    exact_reference,
    grow_descriptors,
    make_mixture,
    make_queries,
    measure,
    recall_at_k,
    run,
    sample_mixture,
)


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def test_structured_data_is_unit_norm_and_queries_find_their_item():
    mixture = make_mixture(dim=64, clusters=20, seed=0)
    database, labels = sample_mixture(mixture, 3000, seed=1, chunk=1000)  # several chunks
    assert database.shape == (3000, 64) and database.dtype == np.float32
    assert np.allclose(np.linalg.norm(database, axis=1), 1.0, atol=1e-5)
    assert len(np.unique(labels)) > 10
    queries, truth = make_queries(database, labels, mixture, 200, seed=2)
    assert np.allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    sims = queries @ database.T
    assert np.mean(np.argmax(sims, axis=1) == truth) > 0.8
    # structured, not uniform: a query's known match is far closer than a typical item
    assert np.median(sims[np.arange(len(truth)), truth]) > np.median(sims) + 0.3


def _fake_real(n: int = 120, dim: int = 48, seed: int = 0) -> np.ndarray:
    """Descriptor-like stand-in: a shared component plus a decaying spectrum (like gem-l8-raw)."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(dim)
    return (3 * common + rng.standard_normal((n, dim)) * (np.arange(dim) + 1.0) ** -0.7).astype(np.float32)


def test_spectral_noise_has_the_real_covariance():
    real = _fake_real(400, 16)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    noise = SpectralNoise(real)(np.random.default_rng(0), 40_000)
    want = np.cov(real.T)
    got = np.cov(noise.T)
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max() + 2 * SpectralNoise(real).floor**2


def test_grown_descriptors_resemble_the_real_ones_and_queries_have_a_known_match():
    real = _fake_real()
    database, queries, truth = grow_descriptors(real, 5000, 100, Growth(place_size=20), seed=1, chunk=1024)
    assert database.shape == (5000, 48) and queries.shape == (100, 48) and database.dtype == np.float32
    assert np.allclose(np.linalg.norm(database, axis=1), 1.0, atol=1e-5)
    unit = real / np.linalg.norm(real, axis=1, keepdims=True)
    # the same typical similarity as the real set (shared component kept), not uniform noise
    assert abs(np.median(database[:500] @ database[:500].T) - np.median(unit @ unit.T)) < 0.1
    _, rank = exact_reference(database, queries, truth)
    assert np.mean(rank == 1) > 0.5 and np.mean(rank <= 10) > 0.8
    # same seed, same data
    again = grow_descriptors(real, 5000, 100, Growth(place_size=20), seed=1, chunk=1024)
    np.testing.assert_array_equal(again[2], truth)
    np.testing.assert_array_equal(again[0], database)


def test_exact_reference_equals_brute_force():
    rng = np.random.default_rng(0)
    database = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((37, 16)).astype(np.float32)
    truth = rng.integers(0, 500, 37)
    top, rank = exact_reference(database, queries, truth, k=10, chunk=8)
    scores = queries @ database.T
    np.testing.assert_array_equal(top, np.argsort(-scores, axis=1, kind="stable")[:, :10])
    want = np.array([int(np.sum(s > s[t])) + 1 for s, t in zip(scores, truth)])
    np.testing.assert_array_equal(rank, want)
    assert recall_at_k(top, top) == 1.0
    assert recall_at_k(np.full_like(top, -1), top) == 0.0


def test_measure_reports_recall_latency_and_memory_per_variant():
    real = _fake_real()
    database, queries, truth = grow_descriptors(real, 3000, 40, seed=2)
    exact_top, _ = exact_reference(database, queries, truth)
    flat = measure("flat", database, queries, truth, exact_top, latency_queries=10)
    assert len(flat) == 1 and flat[0].recall10 == 1.0 and flat[0].index_bytes >= 3000 * 48 * 4
    ivf = measure("ivfpq", database, queries, truth, exact_top, latency_queries=10,
                  variants=({"nprobe": 4}, {"nprobe": 4, "rerank": 1}))
    assert [r.params.split("rerank=")[1] for r in ivf] == ["10", "1"]
    for r in flat + ivf:
        assert r.median_ms > 0 and r.p99_ms >= r.median_ms and r.build_s >= 0 and 0 <= r.recall10 <= 1
    assert ivf[0].index_bytes < flat[0].index_bytes
    assert ivf[0].recall10 >= ivf[1].recall10


def test_quick_run_writes_a_section_and_is_registered():
    text = run(Config(sizes=(2000,), types=("flat", "sq8"), queries=20, latency_queries=5, quick=True), [], lambda m: None)
    assert text.startswith("## Benchmark `scale`")
    assert "| 2,000 | flat |" in text and "| 2,000 | sq8 |" in text
    assert bench_run.BENCHMARKS["scale"] == "cvgl.bench.scale"
