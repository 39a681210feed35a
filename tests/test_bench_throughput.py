"""The throughput benchmark's building blocks: FLOP count (search data and metrics: test_bench_scale)."""

from __future__ import annotations

import pytest

from cvgl.bench.throughput import backbone_flops, counted_flops, vit_flops
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


def test_gemm_rate_per_dtype_is_positive_and_labelled():
    from cvgl.bench.throughput import gemm_gflops

    for dtype in ("fp32", "bf16"):
        result = gemm_gflops("small", 64, 64, 64, min_runs=1, dtype=dtype)
        assert result.dtype == dtype and result.gflops > 0 and result.threads >= 1


def test_interleaved_timing_and_fidelity_on_tiny_encoders():
    """The side-by-side timing times every variant; fidelity of fp32 against itself is exact and
    bf16's is close, with the top-1 agreement counted against fp32's own ranking."""
    import numpy as np
    import torch

    from cvgl.bench.throughput import REFERENCE, fidelity_rows, interleaved_seconds
    from cvgl.models.factory import create_encoder

    encoders = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        encoders[f"{precision} on torch"] = create_encoder("gem", "random:dinov2_tiny_test", (56, 56),
                                                           precision=precision)
    timings = interleaved_seconds(encoders, batch=2, rounds=2, size=56)
    assert set(timings) == set(encoders) and all(s > 0 and runs == 2 for s, runs in timings.values())
    rng = np.random.default_rng(0)
    references = [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(6)]
    queries = [np.clip(r.astype(int) + rng.integers(-20, 20, r.shape), 0, 255).astype(np.uint8) for r in references]
    rows = {row[0]: row for row in fidelity_rows(encoders, references, queries)}
    assert rows[REFERENCE][1] == 12 and float(rows[REFERENCE][3]) >= 0.999999
    assert rows[REFERENCE][4] == rows[REFERENCE][5] == "100.0%"
    assert 0.99 < float(rows["bf16 on torch"][3]) <= 1.0
