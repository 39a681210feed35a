"""Paired augmentations keep a pair aligned, are reproducible from (seed, epoch, index), and jitter lightly."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cvgl.data.augment import AugmentDraw, PairedAugment, dihedral, roll_panorama

FAST = settings(max_examples=60, deadline=None)


def _no_jitter(flip: bool, quarter_turns: int) -> AugmentDraw:
    return AugmentDraw(flip, quarter_turns, 1.0, 1.0, 1.0, 1.0)


def _marker(shape: tuple[int, int], row: int, col: int) -> torch.Tensor:
    image = torch.zeros(3, *shape)
    image[:, row, col] = 1.0
    return image


def _where(image: torch.Tensor) -> tuple[int, int]:
    flat = int(image[0].argmax())
    return divmod(flat, image.shape[-1])


# Plain references for the geometry ------------------------------------------------------------


def _reference_dihedral_point(row: int, col: int, size: int, flip: bool, k: int) -> tuple[int, int]:
    """Where pixel (row, col) of a size x size image goes: mirror columns, then k CCW quarter turns."""
    if flip:
        col = size - 1 - col
    for _ in range(k % 4):
        row, col = size - 1 - col, row  # one counter-clockwise quarter turn
    return row, col


def _bearing(row: int, col: int, size: int) -> float:
    """Clockwise angle from north (image up) of a satellite pixel centre seen from the image centre."""
    centre = size / 2.0
    return math.degrees(math.atan2((col + 0.5) - centre, centre - (row + 0.5))) % 360.0


def _azimuth(col: int, width: int) -> float:
    """Azimuth of panorama column ``col`` under the CVUSA convention (north at the centre)."""
    return ((col + 0.5) / width * 360.0 - 180.0) % 360.0


def _angle_gap(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


# Tests ------------------------------------------------------------------------------------------


@FAST
@given(width=st.integers(1, 70), height=st.integers(1, 5), turns=st.integers(-3, 3))
def test_panorama_roll_by_full_width_is_identity(width, height, turns):
    pano = torch.rand(3, height, width, generator=torch.Generator().manual_seed(width))
    assert torch.equal(roll_panorama(pano, 4), pano)
    assert torch.equal(roll_panorama(pano, 0), pano)
    if width % 4 == 0:
        assert torch.equal(roll_panorama(roll_panorama(pano, turns), 4 - turns), pano)
        # a quarter turn moves column width/4 to column 0 (a roll to the left)
        assert torch.equal(roll_panorama(pano, 1)[..., 0], pano[..., width // 4])


@FAST
@given(size=st.integers(2, 12), row=st.integers(0, 11), col=st.integers(0, 11),
       flip=st.booleans(), k=st.integers(0, 3))
def test_dihedral_matches_plain_point_mapping(size, row, col, flip, k):
    row, col = row % size, col % size
    moved = dihedral(_marker((size, size), row, col), flip, k)
    assert _where(moved) == _reference_dihedral_point(row, col, size, flip, k)


@FAST
@given(row=st.integers(0, 31), col=st.integers(0, 31), flip=st.booleans(), k=st.integers(0, 3))
def test_panorama_and_satellite_stay_aligned(row, col, flip, k):
    """A landmark seen in the satellite at some bearing stays at that azimuth in the panorama."""
    size, height, width = 32, 8, 64
    if (row, col) in ((15, 15), (15, 16), (16, 15), (16, 16)):
        return  # the centre pixels have no meaningful bearing
    bearing = _bearing(row, col, size)
    pano_col = int((bearing + 180.0) % 360.0 / 360.0 * width)
    assert _angle_gap(_azimuth(pano_col, width), bearing) <= 180.0 / width + 1e-9  # the set-up itself
    augment = PairedAugment("panorama", jitter=0.0)
    pano, sat = augment.apply(_marker((height, width), 3, pano_col), _marker((size, size), row, col),
                              _no_jitter(flip, k))
    sat_row, sat_col = _where(sat)
    assert (sat_row, sat_col) == _reference_dihedral_point(row, col, size, flip, k)
    _, new_pano_col = _where(pano)
    gap = _angle_gap(_azimuth(new_pano_col, width), _bearing(sat_row, sat_col, size))
    assert gap <= 180.0 / width + 1e-9, f"panorama {_azimuth(new_pano_col, width):.1f} vs satellite bearing"


@FAST
@given(row=st.integers(0, 15), col=st.integers(0, 15), flip=st.booleans(), k=st.integers(0, 3))
def test_aerial_views_of_different_sizes_move_together(row, col, flip, k):
    """The same ground point (same relative position) stays at the same relative position in both."""
    small, big = 16, 48
    augment = PairedAugment("aerial", jitter=0.0)
    drone, sat = augment.apply(_marker((small, small), row, col),
                               _marker((big, big), 3 * row + 1, 3 * col + 1), _no_jitter(flip, k))
    (dr, dc), (sr, sc) = _where(drone), _where(sat)
    assert (3 * dr + 1, 3 * dc + 1) == (sr, sc)


def test_draws_are_a_pure_function_of_seed_epoch_index():
    augment = PairedAugment("aerial", seed=7)
    query, reference = torch.rand(3, 8, 8), torch.rand(3, 8, 8)
    first = augment(query, reference, epoch=2, index=11)
    augment(query, reference, epoch=0, index=0)  # whatever ran before does not matter
    again = PairedAugment("aerial", seed=7)(query, reference, epoch=2, index=11)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    draws = [augment.draw(augment.generator(0, i)) for i in range(200)]
    assert {d.quarter_turns for d in draws} == {0, 1, 2, 3} and {d.flip for d in draws} == {False, True}
    other = [PairedAugment("aerial", seed=8).draw(augment.generator(0, i)) for i in range(5)]
    assert other == draws[:5]  # draw() uses only the generator it is given
    seeds_differ = [PairedAugment("aerial", seed=8).draw(PairedAugment("aerial", seed=8).generator(0, i))
                    for i in range(20)]
    assert seeds_differ != draws[:20]


def test_switches_disable_flip_and_rotation():
    draws = [PairedAugment("panorama", flip=False, rotate=False, seed=1).draw(torch.Generator().manual_seed(i))
             for i in range(50)]
    assert all(not d.flip and d.quarter_turns == 0 for d in draws)


def test_jitter_is_small_independent_per_view_and_leaves_geometry_alone():
    jitter = 0.1
    augment = PairedAugment("aerial", jitter=jitter, seed=0)
    draws = [augment.draw(augment.generator(0, i)) for i in range(100)]
    factors = [f for d in draws for f in (d.query_brightness, d.query_contrast,
                                          d.reference_brightness, d.reference_contrast)]
    assert all(1 - jitter <= f <= 1 + jitter for f in factors)
    assert any(d.query_brightness != d.reference_brightness for d in draws)
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    d = AugmentDraw(True, 1, 1.1, 0.9, 0.95, 1.05)
    q, r = augment.apply(image, image.clone(), d)
    plain_q, plain_r = PairedAugment("aerial", jitter=0.0).apply(image, image.clone(), d)
    mean = plain_q.mean()
    torch.testing.assert_close(q, ((plain_q - mean) * 0.9 + mean).mul(1.1).clamp(0, 1))
    assert not torch.equal(q, r)  # the two views got different photometric changes
    assert float((q - plain_q).abs().max()) < 0.25 and float((r - plain_r).abs().max()) < 0.25
    assert 0.0 <= float(q.min()) and float(q.max()) <= 1.0


def test_quarter_turns_need_square_images():
    augment = PairedAugment("aerial", jitter=0.0)
    with pytest.raises(ValueError, match="square"):
        augment.apply(torch.rand(3, 8, 12), torch.rand(3, 8, 8), _no_jitter(False, 1))
    assert augment.apply(torch.rand(3, 8, 12), torch.rand(3, 8, 8), _no_jitter(True, 2))[0].shape == (3, 8, 12)
    PairedAugment("panorama").check_sizes((8, 32), (16, 16))  # panoramas are only rolled
    with pytest.raises(ValueError, match="reference"):
        PairedAugment("panorama").check_sizes((8, 32), (16, 20))
    with pytest.raises(ValueError, match="kind"):
        PairedAugment("street")


def test_query_rotation_turns_the_query_alone_within_the_bound_and_keeps_other_draws():
    plain, turned = PairedAugment("aerial", seed=3), PairedAugment("aerial", seed=3, query_rotation_deg=11.25)
    angles = []
    for index in range(64):
        a, b = plain.draw(plain.generator(1, index)), turned.draw(turned.generator(1, index))
        assert a.query_angle_deg == 0.0 and dataclasses.replace(b, query_angle_deg=0.0) == a  # same six draws
        angles.append(b.query_angle_deg)
    assert max(map(abs, angles)) <= 11.25 and min(angles) < -5 and max(angles) > 5
    query = torch.zeros(3, 57, 57)
    query[:, 8:49, 27:30] = 1.0  # a vertical bar through the centre
    reference = torch.rand(3, 57, 57, generator=torch.Generator().manual_seed(0))
    draw = dataclasses.replace(plain.draw(plain.generator(0, 0)), flip=False, quarter_turns=0, query_angle_deg=10.0,
                               query_brightness=1.0, query_contrast=1.0, reference_brightness=1.0, reference_contrast=1.0)
    q, r = turned.apply(query, reference, draw)
    assert torch.equal(r, reference)  # the tile stays north-up
    # A clockwise turn moves the bar's top end right (and its bottom end left).
    top, bottom = q[0, 10].argmax().item(), q[0, 46].argmax().item()
    assert top > 28 > bottom
    with pytest.raises(ValueError, match="query_rotation_deg"):
        PairedAugment("panorama", query_rotation_deg=5.0)
