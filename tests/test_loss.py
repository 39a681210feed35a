"""Symmetric InfoNCE vs a hand-written loop; temperature clamp; gradients; sharded (DDP) batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cvgl.train.loss import SymmetricInfoNCE

FAST = settings(max_examples=30, deadline=None)


def loop_loss(q: torch.Tensor, r: torch.Tensor, scale: float, smoothing: float) -> float:
    """The paper's L = (L_ga + L_ag) / 2 with smoothed targets, one row at a time, in float64."""
    q, r = q.double().tolist(), r.double().tolist()
    n = len(q)

    def direction(a, b) -> float:
        total = 0.0
        for i in range(n):
            logits = [scale * sum(x * y for x, y in zip(a[i], b[j], strict=True)) for j in range(n)]
            top = max(logits)
            log_z = top + math.log(sum(math.exp(v - top) for v in logits))
            nll = [log_z - v for v in logits]
            total += (1 - smoothing) * nll[i] + smoothing * sum(nll) / n
        return total / n

    return (direction(q, r) + direction(r, q)) / 2


def descriptors(b: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g), dim=1)
    r = F.normalize(q + 0.5 * torch.randn(b, d, generator=g), dim=1)
    return q, r


@FAST
@given(b=st.integers(1, 6), d=st.integers(1, 5), smoothing=st.sampled_from([0.0, 0.1, 0.3]),
       temperature=st.floats(0.01, 1.0), seed=st.integers(0, 10**6))
def test_loss_equals_the_loop(b, d, smoothing, temperature, seed):
    q, r = descriptors(b, d, seed)
    loss = SymmetricInfoNCE(init_temperature=temperature, label_smoothing=smoothing)
    expected = loop_loss(q, r, min(1.0 / temperature, 100.0), smoothing)
    assert loss(q, r).item() == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_defaults_are_clip_and_sample4geo():
    loss = SymmetricInfoNCE()
    assert loss.scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert loss.label_smoothing == 0.1


def test_scale_is_clamped_to_temperatures_between_001_and_1():
    loss = SymmetricInfoNCE()
    q, r = descriptors(4, 3, 0)
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(1e4))
    assert loss.scale.item() == pytest.approx(100.0)
    assert loss(q, r).item() == pytest.approx(loop_loss(q, r, 100.0, 0.1), rel=1e-5)
    loss(q, r).backward()
    assert loss.logit_scale.grad.item() == 0.0  # clamped: no push further out
    with torch.no_grad():
        loss.logit_scale.fill_(-3.0)
    assert loss.scale.item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        SymmetricInfoNCE(init_temperature=0.001)


def test_gradient_reaches_logit_scale_and_descriptors():
    loss = SymmetricInfoNCE()
    q, r = descriptors(5, 4, 1)
    q.requires_grad_(True)
    loss(q, r).backward()
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad.item() != 0.0
    assert q.grad is not None and q.grad.abs().sum() > 0
    h = 1e-4  # the gradient is the slope of the loop's loss in log(1/T)
    start = loss.logit_scale.item()
    slope = (loop_loss(q, r, math.exp(start + h), 0.1) - loop_loss(q, r, math.exp(start - h), 0.1)) / (2 * h)
    assert loss.logit_scale.grad.item() == pytest.approx(slope, rel=1e-3)


def test_sharded_losses_average_to_the_full_batch_loss_with_the_same_gradients():
    """Two simulated processes with all-gathered descriptors vs one process on the whole batch."""
    q, r = descriptors(8, 6, 2)
    full_q, full_r = q.clone().requires_grad_(True), r.clone().requires_grad_(True)
    criterion = SymmetricInfoNCE()
    full = criterion(full_q, full_r)
    full.backward()
    shard_q, shard_r = q.clone().requires_grad_(True), r.clone().requires_grad_(True)
    losses = []
    for rank in range(2):
        lo, hi = 4 * rank, 4 * rank + 4
        losses.append(criterion(shard_q[lo:hi], shard_r[lo:hi], q_all=shard_q, r_all=shard_r, offset=lo))
    average = sum(losses) / 2
    assert average.item() == pytest.approx(full.item(), rel=1e-6)
    average.backward()
    assert torch.allclose(shard_q.grad, full_q.grad, atol=1e-6)
    assert torch.allclose(shard_r.grad, full_r.grad, atol=1e-6)


def test_bad_shapes_and_offsets_are_rejected():
    loss = SymmetricInfoNCE()
    q, r = descriptors(4, 3, 0)
    with pytest.raises(ValueError):
        loss(q, r[:3])
    with pytest.raises(ValueError):
        loss(q, r, q_all=q, r_all=r, offset=1)  # 4 local rows do not fit at offset 1 of 4
    with pytest.raises(ValueError):
        loss(q, r, q_all=torch.zeros(8, 2), r_all=torch.zeros(8, 3))


def loop_loss_with_wrong(q, r, wrong, scale: float, smoothing: float) -> float:
    """Query i must beat every reference, and its wrong-heading twin on every reference but its own."""
    q, r, wrong = q.double().tolist(), r.double().tolist(), wrong.double().tolist()
    n = len(q)
    dot = lambda a, b: scale * sum(x * y for x, y in zip(a, b, strict=True))

    def row(logits: list[float], target: int) -> float:
        top = max(logits)
        log_z = top + math.log(sum(math.exp(v - top) for v in logits))
        nll = [log_z - v for v in logits]
        return (1 - smoothing) * nll[target] + smoothing * sum(nll) / len(logits)

    forward = sum(row([dot(q[i], r[j]) for j in range(n)] + [dot(wrong[i], r[j]) for j in range(n) if j != i], i)
                  for i in range(n)) / n
    backward = sum(row([dot(r[i], q[j]) for j in range(n)], i) for i in range(n)) / n
    return (forward + backward) / 2


@FAST
@given(b=st.integers(1, 6), d=st.integers(1, 5), smoothing=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 10**6))
def test_wrong_heading_negatives_equal_the_loop(b, d, smoothing, seed):
    q, r = descriptors(b, d, seed)
    wrong = F.normalize(torch.randn(b, d, generator=torch.Generator().manual_seed(seed + 1)), dim=1)
    loss = SymmetricInfoNCE(label_smoothing=smoothing)
    expected = loop_loss_with_wrong(q, r, wrong, 1 / 0.07, smoothing)
    assert loss(q, r, wrong=wrong).item() == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_a_wrong_heading_costs_only_when_it_finds_another_tile():
    q, r = descriptors(4, 6, 3)
    loss = SymmetricInfoNCE(label_smoothing=0.0)
    on_own_tile = loss(q, r, wrong=r.clone()).item()  # each twin matches its own tile perfectly: no penalty there
    on_next_tile = loss(q, r, wrong=r.roll(1, dims=0)).item()  # each twin matches a neighbour's tile perfectly
    assert on_next_tile > on_own_tile
    with pytest.raises(ValueError, match="wrong must be"):
        loss(q, r, wrong=q[:3])


def test_wrong_heading_negatives_shard_like_the_full_batch():
    q, r = descriptors(8, 6, 4)
    wrong = F.normalize(q.flip(1), dim=1)
    criterion = SymmetricInfoNCE()
    full = criterion(q, r, wrong=wrong).item()
    shards = [criterion(q[lo:lo + 4], r[lo:lo + 4], q_all=q, r_all=r, offset=lo, wrong=wrong[lo:lo + 4]).item() for lo in (0, 4)]
    assert sum(shards) / 2 == pytest.approx(full, rel=1e-6)
