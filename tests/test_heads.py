"""Pooling heads: GeM (clamped / signed / abs), SW-R-MAC and the concatenating head.

Every pooling is compared with a naive loop over channels and cells written from the definition.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cvgl.models.backbone import LayerTokens
from cvgl.models.heads import EPS, HeadConfig, PoolingHead, PoolSpec, disc_mask, gem, region_bounds, sw_rmac

FAST = settings(max_examples=60, deadline=None)

# ------------------------------------------------------------------------------ naive references


def naive_gem(grid: np.ndarray, p: float, signed: str) -> np.ndarray:
    """``[B, C, h, w]`` -> ``[B, C]``, one python loop per channel over every cell."""
    b, c, h, w = grid.shape
    out = np.zeros((b, c))
    for i in range(b):
        for j in range(c):
            values = [float(grid[i, j, r, s]) for r in range(h) for s in range(w)]
            if signed == "clamp":
                out[i, j] = (sum(max(v, EPS) ** p for v in values) / len(values)) ** (1 / p)
            elif signed == "abs":
                out[i, j] = (sum(max(abs(v), EPS) ** p for v in values) / len(values)) ** (1 / p)
            else:
                m = sum(math.copysign(abs(v) ** p, v) for v in values) / len(values)
                out[i, j] = math.copysign(max(abs(m), EPS) ** (1 / p), m) if m != 0 else 0.0
    return out


def naive_splits(size: int, parts: int) -> list[range]:
    """``min(parts, size)`` contiguous ranges, boundaries at the rounded multiples of size/parts."""
    parts = min(parts, size)
    cuts = [int(round(k * size / parts)) for k in range(parts + 1)]
    return [range(cuts[k], cuts[k + 1]) for k in range(parts)]


def naive_sw_rmac(grid: np.ndarray, levels, level_power: float, p: float, signed: str) -> np.ndarray:
    b, c, h, w = grid.shape
    total = np.zeros((b, c))
    for level in levels:
        for rows in naive_splits(h, level):
            for cols in naive_splits(w, level):
                region = grid[:, :, rows.start : rows.stop, cols.start : cols.stop]
                pooled = naive_gem(region, p, signed)
                for i in range(b):
                    norm = math.sqrt(sum(v * v for v in pooled[i]))
                    total[i] += pooled[i] / max(norm, 1e-12) / level**level_power
    return total


def _grid(seed: int, shape: tuple[int, ...], dtype=np.float64) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


# ------------------------------------------------------------------------------ GeM


@FAST
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(1, 6), w=st.integers(1, 6))
def test_gem_p1_clamped_on_positive_input_is_mean(seed: int, h: int, w: int) -> None:
    x = torch.from_numpy(np.abs(_grid(seed, (2, 5, h, w))) + 0.01)
    torch.testing.assert_close(gem(x, p=1.0, signed="clamp"), x.mean(dim=(2, 3)))
    torch.testing.assert_close(gem(x, p=1.0, signed="signed"), x.mean(dim=(2, 3)))


@FAST
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(1, 6), w=st.integers(1, 6))
def test_signed_gem_p1_is_mean_on_any_input(seed: int, h: int, w: int) -> None:
    x = torch.from_numpy(_grid(seed, (2, 5, h, w)))
    mean = x.mean(dim=(2, 3))
    expected = mean.sign() * mean.abs().clamp(min=EPS)
    torch.testing.assert_close(gem(x, p=1.0, signed="signed"), expected)


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    p=st.sampled_from([1.0, 2.0, 3.0, 4.5]),
    signed=st.sampled_from(["clamp", "signed", "abs"]),
)
def test_gem_equals_naive_loop(seed: int, h: int, w: int, p: float, signed: str) -> None:
    grid = _grid(seed, (2, 4, h, w))
    got = gem(torch.from_numpy(grid), p=p, signed=signed).numpy()
    np.testing.assert_allclose(got, naive_gem(grid, p, signed), rtol=1e-9, atol=1e-12)


@FAST
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(1, 6), w=st.integers(1, 6), p=st.sampled_from([1.0, 3.0, 5.0]))
def test_signed_gem_is_odd(seed: int, h: int, w: int, p: float) -> None:
    x = torch.from_numpy(_grid(seed, (2, 6, h, w), np.float32))
    assert torch.equal(gem(-x, p=p, signed="signed"), -gem(x, p=p, signed="signed"))


def test_signed_gem_keeps_negative_evidence_clamped_does_not() -> None:
    x = -torch.rand(1, 3, 4, 4) - 0.5  # all negative
    assert (gem(x, signed="signed") < -0.4).all()
    torch.testing.assert_close(gem(x, signed="clamp"), torch.full((1, 3), EPS))
    torch.testing.assert_close(gem(x, signed="abs"), gem(-x, signed="clamp"))


@FAST
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(1, 6), w=st.integers(1, 6), p=st.sampled_from([1.0, 3.0]))
def test_masked_signed_gem_equals_naive_over_kept_cells(seed: int, h: int, w: int, p: float) -> None:
    grid = _grid(seed, (2, 4, h, w))
    mask = disc_mask(h, w).double()
    rows, cols = np.nonzero(mask.numpy())
    assert len(rows) >= 1  # the inscribed disc always keeps the centre cell(s)
    kept = grid[:, :, rows, cols][:, :, None, :]  # [B, C, 1, n]
    got = gem(torch.from_numpy(grid), p=p, signed="signed", mask=mask).numpy()
    np.testing.assert_allclose(got, naive_gem(kept, p, "signed"), rtol=1e-9, atol=1e-12)


def test_disc_mask_shape() -> None:
    expected = np.array(
        [
            [0, 1, 1, 0],
            [1, 1, 1, 1],
            [1, 1, 1, 1],
            [0, 1, 1, 0],
        ]
    )
    np.testing.assert_array_equal(disc_mask(4, 4).numpy(), expected)
    # 3x7: radius 1.5 around the centre keeps the middle 3x3 block (corner offsets sqrt(2) < 1.5)
    expected_3x7 = np.zeros((3, 7))
    expected_3x7[:, 2:5] = 1
    np.testing.assert_array_equal(disc_mask(3, 7).numpy(), expected_3x7)
    for h in range(1, 8):
        for w in range(1, 8):
            naive = [
                [1.0 if (r + 0.5 - h / 2) ** 2 + (c + 0.5 - w / 2) ** 2 <= (min(h, w) / 2) ** 2 else 0.0 for c in range(w)]
                for r in range(h)
            ]
            np.testing.assert_array_equal(disc_mask(h, w).numpy(), np.array(naive))


def test_gem_unknown_sign_mode() -> None:
    with pytest.raises(ValueError, match="unknown GeM"):
        gem(torch.ones(1, 1, 2, 2), signed="relu")


# ------------------------------------------------------------------------------ regions and SW-R-MAC


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 64), parts=st.integers(1, 12))
def test_region_bounds_partition(size: int, parts: int) -> None:
    bounds = region_bounds(size, parts)
    assert len(bounds) == min(parts, size)
    covered = [cell for start, stop in bounds for cell in range(start, stop)]
    assert covered == list(range(size))  # every cell once, in order, contiguous
    lengths = [stop - start for start, stop in bounds]
    assert min(lengths) >= 1
    assert max(lengths) - min(lengths) <= 1  # near-equal


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    signed=st.sampled_from(["clamp", "signed"]),
    level_power=st.sampled_from([0.0, 1.0, 6.0]),
)
def test_sw_rmac_equals_naive_loop(seed: int, h: int, w: int, signed: str, level_power: float) -> None:
    grid = _grid(seed, (2, 5, h, w))
    levels = (1, 2, 3)
    got = sw_rmac(torch.from_numpy(grid), levels=levels, level_power=level_power, p=3.0, signed=signed).numpy()
    expected = naive_sw_rmac(grid, levels, level_power, 3.0, signed)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_sw_rmac_single_level_is_normalised_gem() -> None:
    x = torch.randn(3, 8, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(sw_rmac(x, levels=(1,)), F.normalize(gem(x), dim=-1))


def test_sw_rmac_level_two_weight() -> None:
    """On a constant positive grid every region pools to the same unit vector: total = sum of weights."""
    x = torch.ones(1, 4, 6, 6, dtype=torch.float64)
    unit = F.normalize(gem(x), dim=-1)
    torch.testing.assert_close(sw_rmac(x, levels=(1, 2), level_power=6.0), unit * (1 + 4 / 2**6))


# ------------------------------------------------------------------------------ the head


def _tokens(seed: int, dims: dict[int, int], grid: tuple[int, int] = (3, 5), batch: int = 4) -> dict[int, LayerTokens]:
    gen = torch.Generator().manual_seed(seed)
    return {
        layer: LayerTokens(cls=torch.randn(batch, dim, generator=gen), patches=torch.randn(batch, dim, *grid, generator=gen))
        for layer, dim in dims.items()
    }


def test_head_output_is_unit_and_concatenated() -> None:
    pools = (
        PoolSpec(kind="cls", layer=-1),
        PoolSpec(kind="gem", layer=1, weight=0.5),
        PoolSpec(kind="swrmac", layer=-1, levels=(1, 2, 3), weight=2.0),
    )
    head = PoolingHead(HeadConfig(pools))
    assert head.layers == [-1, 1]
    tokens = _tokens(0, {-1: 12, 1: 8})
    out = head(tokens)
    assert out.shape == (4, 12 + 8 + 12)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4))

    # reference: each part L2-normalised and weighted, concatenated, L2-normalised (the poolings
    # themselves are checked against naive loops above; here only the composition)
    parts = [
        F.normalize(tokens[-1].cls, dim=-1),
        0.5 * F.normalize(gem(tokens[1].patches), dim=-1),
        2.0 * F.normalize(sw_rmac(tokens[-1].patches, levels=(1, 2, 3)), dim=-1),
    ]
    expected = F.normalize(torch.cat(parts, dim=-1), dim=-1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # weights change the balance: the swrmac block carries 2/0.5 = 4x the gem block's norm
    assert out[:, 20:].norm(dim=-1) / out[:, 12:20].norm(dim=-1) == pytest.approx(torch.full((4,), 4.0), rel=1e-5)


@pytest.mark.parametrize("kind", ["cls", "gem", "swrmac"])
def test_single_pool_head_is_unit(kind: str) -> None:
    head = PoolingHead(HeadConfig((PoolSpec(kind=kind, layer=2, signed="signed"),)))
    out = head(_tokens(1, {2: 16}, grid=(1, 7)))
    assert out.shape == (4, 16)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4))


def test_head_refuses_empty_and_unknown() -> None:
    with pytest.raises(ValueError):
        PoolingHead(HeadConfig(()))
    head = PoolingHead(HeadConfig((PoolSpec(kind="netvlad", layer=1),)))
    with pytest.raises(ValueError, match="unknown pooling"):
        head(_tokens(0, {1: 4}))
