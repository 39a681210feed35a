"""SALAD head: log-domain Sinkhorn vs a plain float64 Sinkhorn, marginals (incl. n <= M), and the
whole forward pass vs a loop written from the paper's equations."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cvgl.models.backbone import LayerTokens
from cvgl.models.salad import Salad, SaladConfig, log_sinkhorn, transport_marginals

FAST = settings(max_examples=30, deadline=None)


def reference_sinkhorn(scores: np.ndarray, cluster_mass: np.ndarray, feature_mass: np.ndarray, iters: int):
    """Textbook Sinkhorn-Knopp on ``K = exp(scores)`` ``[R, n]``: columns, then (rows, columns)."""
    kernel = np.exp(scores.astype(np.float64))
    u = np.ones(kernel.shape[0])
    v = feature_mass / kernel.sum(axis=0)
    for _ in range(iters):
        u = cluster_mass / (kernel @ v)
        v = feature_mass / (kernel.T @ u)
    return u[:, None] * kernel * v[None, :]


def small_config(**overrides) -> SaladConfig:
    base = {"num_channels": 8, "num_clusters": 6, "cluster_dim": 4, "token_dim": 3, "dropout": 0.0, "out_dim": 5}
    return SaladConfig(**{**base, **overrides})


def random_tokens(batch: int, channels: int, h: int, w: int, seed: int = 0) -> LayerTokens:
    g = torch.Generator().manual_seed(seed)
    return LayerTokens(cls=torch.randn(batch, channels, generator=g), patches=torch.randn(batch, channels, h, w, generator=g))


# ------------------------------------------------------------------------------------ marginals


@FAST
@given(m=st.integers(1, 80), n=st.integers(1, 400), fraction=st.floats(0.01, 0.9))
def test_marginals_balance_and_match_the_paper_when_there_are_enough_tokens(m, n, fraction):
    clusters, features = transport_marginals(m, n, dustbin=True, min_dustbin_fraction=fraction)
    assert clusters.shape == (m + 1,) and features.shape == (n,)
    assert torch.all(features == 1)
    assert clusters.sum().item() == pytest.approx(n)
    assert torch.all(clusters > 0)
    assert clusters[-1].item() >= fraction * n - 1e-9
    if n - m >= fraction * n:  # the paper's kappa = [1_M, n - M]
        assert torch.allclose(clusters[:m], torch.ones(m, dtype=torch.float64))
        assert clusters[-1].item() == n - m


def test_marginals_for_few_tokens_are_continuous_at_the_switch():
    m, fraction = 9, 0.1
    n_switch = 10  # n - m == fraction * n
    at, _ = transport_marginals(m, n_switch, True, fraction)
    assert torch.allclose(at, torch.tensor([1.0] * m + [1.0], dtype=torch.float64))
    few, _ = transport_marginals(m, 4, True, fraction)  # n < M: dustbin 0.4, clusters 3.6 / 9
    assert few[-1].item() == pytest.approx(0.4)
    assert torch.allclose(few[:m], torch.full((m,), 0.4, dtype=torch.float64))


def test_marginals_without_dustbin_are_balanced():
    clusters, features = transport_marginals(4, 10, dustbin=False)
    assert torch.allclose(clusters, torch.full((4,), 2.5, dtype=torch.float64)) and features.sum() == 10


# ------------------------------------------------------------------------------------- sinkhorn


@FAST
@given(rows=st.integers(1, 9), n=st.integers(1, 30), iters=st.sampled_from([0, 1, 3, 50]), seed=st.integers(0, 10**6))
def test_log_sinkhorn_equals_plain_sinkhorn(rows, n, iters, seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(0.0, 2.0, (rows, n))
    dustbin = rows > 1
    clusters, features = transport_marginals(rows - 1 if dustbin else rows, n, dustbin)
    expected = reference_sinkhorn(scores, clusters.numpy(), features.numpy(), iters)
    got = log_sinkhorn(torch.tensor(scores)[None], clusters.log(), features.log(), iters).exp()[0]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("m,n", [(8, 40), (8, 8), (8, 3), (64, 16)])
def test_plan_has_unit_feature_mass_and_converges_to_the_cluster_marginals(m, n):
    g = torch.Generator().manual_seed(m * n)
    scores = torch.randn(2, m + 1, n, generator=g, dtype=torch.float64)
    clusters, features = transport_marginals(m, n, dustbin=True)
    short = log_sinkhorn(scores, clusters.log(), features.log(), 3).exp()
    assert torch.allclose(short.sum(dim=1), torch.ones(2, n, dtype=torch.float64))  # exact after any iters
    plan = log_sinkhorn(scores, clusters.log(), features.log(), 2000).exp()
    assert torch.allclose(plan.sum(dim=1), torch.ones(2, n, dtype=torch.float64))
    assert torch.allclose(plan.sum(dim=2), clusters.expand(2, -1), atol=1e-6)


# --------------------------------------------------------------------------------------- module


def reference_descriptor(head: Salad, tokens: LayerTokens) -> torch.Tensor:
    """The paper's Sec. 3.3 as loops, with the plain Sinkhorn, in float64 (eval mode)."""
    c = head.config
    batch, _, h, w = tokens.patches.shape
    n = h * w
    scores = head.score(tokens.patches).flatten(2).double()
    local = head.features(tokens.patches).flatten(2).double()
    cls = head.token(tokens.cls).double()
    clusters_mass, features_mass = transport_marginals(c.num_clusters, n, c.dustbin, c.min_dustbin_fraction)
    out = []
    for b in range(batch):
        s = scores[b].detach().numpy()
        if c.dustbin:
            s = np.vstack([s, np.full((1, n), float(head.dustbin))])
        plan = reference_sinkhorn(s, clusters_mass.numpy(), features_mass.numpy(), c.sinkhorn_iters)
        parts = []
        for m in range(c.num_clusters):
            v = sum(plan[m, i] * local[b, :, i].detach().numpy() for i in range(n))
            parts.append(v / max(np.linalg.norm(v), 1e-12))
        t = cls[b].detach().numpy()
        parts.append(t / np.linalg.norm(t))
        d = np.concatenate(parts)
        d = d / np.linalg.norm(d)
        if head.projection is not None:
            d = head.projection.weight.double().detach().numpy() @ d + head.projection.bias.double().detach().numpy()
            d = d / np.linalg.norm(d)
        out.append(d)
    return torch.tensor(np.stack(out))


@pytest.mark.parametrize("dustbin", [True, False])
@pytest.mark.parametrize("hw", [(4, 5), (2, 2), (1, 1), (3, 7)])  # n = 20 > M = 6, and n <= M
@pytest.mark.parametrize("out_dim", [5, None])
def test_forward_matches_the_paper_written_as_loops(dustbin, hw, out_dim):
    torch.manual_seed(1)
    head = Salad(small_config(dustbin=dustbin, out_dim=out_dim)).eval()
    with torch.no_grad():
        if dustbin:
            head.dustbin.fill_(0.3)
        tokens = random_tokens(2, 8, *hw)
        got = head(tokens)
        expected = reference_descriptor(head, tokens)
    assert got.dtype == torch.float32 and got.shape == (2, head.out_dim)
    assert head.out_dim == (out_dim or 6 * 4 + 3)
    assert torch.allclose(got.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(got.double(), expected, atol=2e-5)


def test_default_config_gives_a_1024_descriptor_for_dinov2_s_tokens():
    head = Salad(SaladConfig(num_channels=384)).eval()
    with torch.no_grad():
        out = head(random_tokens(2, 384, 16, 16))
    assert out.shape == (2, 1024) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    assert head.describe() == json.loads(json.dumps(head.describe()))
    assert head.describe()["kind"] == "salad" and head.describe()["num_clusters"] == 64


@pytest.mark.parametrize("iters", [0, 1])
def test_gradients_reach_the_dustbin_and_every_branch(iters):
    """With few iterations z matters (with many it cancels, see the next tests)."""
    torch.manual_seed(0)
    head = Salad(small_config(sinkhorn_iters=iters))
    tokens = random_tokens(3, 8, 3, 4)
    target = torch.randn(3, head.out_dim)
    (head(tokens) * target).sum().backward()
    assert head.dustbin.grad is not None and head.dustbin.grad.abs().item() > 0
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("hw", [(4, 4), (2, 3)])
def test_assignments_split_each_token_between_clusters_and_dustbin(hw):
    torch.manual_seed(0)
    head = Salad(small_config()).eval()
    tokens = random_tokens(2, 8, *hw)
    with torch.no_grad():
        a = head.assignments(tokens)
    h, w = hw
    assert a.plan.shape == (2, 7, h * w)
    assert a.dustbin_weight.shape == (2, h, w) and a.cluster_probs.shape == (2, 6, h, w)
    assert torch.allclose(a.cluster_probs.sum(1) + a.dustbin_weight, torch.ones(2, h, w), atol=1e-5)
    assert torch.all((a.dustbin_weight >= 0) & (a.dustbin_weight <= 1 + 1e-6))
    assert torch.equal(a.plan[:, 6].reshape(2, h, w), a.dustbin_weight)


@pytest.mark.parametrize("iters", [0, 1])
def test_a_larger_dustbin_score_discards_more_of_every_token(iters):
    torch.manual_seed(0)
    head = Salad(small_config(sinkhorn_iters=iters)).eval()
    tokens = random_tokens(1, 8, 4, 4)
    weights = []
    with torch.no_grad():
        for z in (-2.0, 0.0, 2.0, 4.0):
            head.dustbin.fill_(z)
            weights.append(head.assignments(tokens).dustbin_weight)
    for low, high in itertools.pairwise(weights):
        assert torch.all(high > low)


def test_at_full_convergence_a_constant_dustbin_row_cancels():
    """The module doc's caveat: a converged plan ignores z (the marginals decide the dustbin)."""
    torch.manual_seed(0)
    head = Salad(small_config(sinkhorn_iters=3000)).eval().double()
    tokens = random_tokens(1, 8, 4, 4)
    tokens = LayerTokens(cls=tokens.cls.double(), patches=tokens.patches.double())
    plans = []
    with torch.no_grad():
        for z in (-2.0, 3.0):
            head.dustbin.fill_(z)
            plans.append(head.assignments(tokens).plan)
    assert torch.allclose(plans[0], plans[1], atol=1e-5)


def test_without_dustbin_the_plan_has_no_dustbin_row_and_zero_dustbin_map():
    head = Salad(small_config(dustbin=False)).eval()
    assert head.dustbin is None
    with torch.no_grad():
        a = head.assignments(random_tokens(1, 8, 3, 3))
    assert a.plan.shape == (1, 6, 9) and torch.all(a.dustbin_weight == 0)
    assert torch.allclose(a.cluster_probs.sum(1), torch.ones(1, 3, 3), atol=1e-5)


def test_half_precision_tokens_give_a_float32_descriptor():
    head = Salad(small_config()).eval().to(torch.bfloat16)
    tokens = random_tokens(2, 8, 4, 4)
    tokens = LayerTokens(cls=tokens.cls.bfloat16(), patches=tokens.patches.bfloat16())
    with torch.no_grad():
        out = head(tokens)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-2)
