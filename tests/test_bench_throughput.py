"""The throughput benchmark's building blocks: FLOP count, structured search data, search metrics."""

from __future__ import annotations

import numpy as np
import pytest

from cvgl.bench.throughput import (
    IndexSpec,
    backbone_flops,
    counted_flops,
    make_mixture,
    make_queries,
    sample_mixture,
    search_benchmark,
    structured_dataset,
    vit_flops,
)
from cvgl.models.backbone import build_backbone


@pytest.mark.parametrize("blocks", [1, 2])
def test_analytic_flops_match_flop_counter_on_tiny_vit(blocks):
    backbone = build_backbone("dinov2_tiny_test")
    analytic = backbone_flops(backbone, (56, 56), blocks)["total"]
    counted = counted_flops(backbone, (56, 56), blocks)
    assert counted > 0
    assert abs(analytic - counted) / counted < 0.02


def test_vit_flops_formula_for_vits14_at_224():
    parts = vit_flops(width=384, blocks=12, grid=(16, 16))
    n, c = 257, 384
    assert parts["tokens"] == n
    assert parts["per_block"] == 2 * (12 * n * c * c + 2 * n * n * c)
    assert parts["patch_embed"] == 2 * 256 * c * 3 * 14 * 14
    assert 12.0e9 < parts["total"] < 12.5e9  # ViT-S/14 at 224 px: ~6.1 GMAC (256 patches + class token)


def test_structured_data_is_unit_norm_and_queries_find_their_item():
    mixture = make_mixture(dim=64, clusters=20, seed=0)
    database, labels = sample_mixture(mixture, 3000, seed=1, chunk=1000)  # several chunks
    assert database.shape == (3000, 64) and database.dtype == np.float32
    assert np.allclose(np.linalg.norm(database, axis=1), 1.0, atol=1e-5)
    assert len(np.unique(labels)) > 10
    queries, truth = make_queries(database, labels, mixture, 200, seed=2)
    assert np.allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    top1 = np.argmax(queries @ database.T, axis=1)
    assert np.mean(top1 == truth) > 0.8
    # structured, not uniform: a query's known match is far closer than a typical item
    sims = queries @ database.T
    assert np.median(sims[np.arange(len(truth)), truth]) > np.median(sims) + 0.3


@pytest.fixture
def one_faiss_thread():
    """OpenMP threads spin-wait: on a busy CI machine one thread keeps this test fast."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def test_search_benchmark_on_2000_vectors(one_faiss_thread):
    database, queries, truth, _ = structured_dataset(2000, queries=50, dim=96, clusters=20)
    specs = [
        IndexSpec("flat"),
        IndexSpec("hnsw", {"M": 16, "efConstruction": 40}, ({"efSearch": 32},)),
        IndexSpec("ivfpq", {"nlist": 8, "m": 12, "nbits": 5, "train_per_list": 250}, ({"nprobe": 4},)),
    ]
    results = search_benchmark(database, queries, truth, specs, batch=20, min_runs=2, budget_s=0.05)
    assert [r.kind for r in results] == ["flat", "hnsw", "ivfpq"]
    flat = results[0]
    assert flat.recall_vs_exact == 1.0
    assert flat.match_at_10 >= 0.9
    assert flat.bytes >= 2000 * 96 * 4
    for r in results:
        assert r.latency_b1_ms > 0 and r.latency_b100_ms > 0 and r.build_s >= 0
        assert 0.0 <= r.recall_vs_exact <= 1.0
    assert results[1].recall_vs_exact > 0.5
    assert results[2].bytes < flat.bytes
