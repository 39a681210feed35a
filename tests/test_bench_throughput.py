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
