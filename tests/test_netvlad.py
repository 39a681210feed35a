"""NetVLAD head: vectorised residuals vs a plain loop, forward vs the definition, k-means init."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cvgl.models.backbone import LayerTokens
from cvgl.models.netvlad import NetVLAD, NetVLADConfig, kmeans, vlad_residuals

FAST = settings(max_examples=30, deadline=None)


def loop_residuals(features: np.ndarray, assign: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``V[b, k, c] = sum_i a[b, k, i] (x[b, c, i] - c[k, c])``, one scalar at a time."""
    batch, channels, n = features.shape
    k = centroids.shape[0]
    out = np.zeros((batch, k, channels))
    for b in range(batch):
        for j in range(k):
            for c in range(channels):
                out[b, j, c] = sum(assign[b, j, i] * (features[b, c, i] - centroids[j, c]) for i in range(n))
    return out


@FAST
@given(batch=st.integers(1, 2), channels=st.integers(1, 5), n=st.integers(1, 7), k=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_vectorised_residuals_equal_the_loop(batch, channels, n, k, seed):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(batch, channels, n))
    assign = rng.random((batch, k, n))
    centroids = rng.normal(size=(k, channels))
    got = vlad_residuals(torch.tensor(features), torch.tensor(assign), torch.tensor(centroids))
    np.testing.assert_allclose(got.numpy(), loop_residuals(features, assign, centroids), rtol=1e-10, atol=1e-12)


def tokens(batch: int, channels: int, h: int, w: int, seed: int = 0) -> LayerTokens:
    g = torch.Generator().manual_seed(seed)
    return LayerTokens(cls=torch.randn(batch, channels, generator=g), patches=torch.randn(batch, channels, h, w, generator=g))


def reference_descriptor(head: NetVLAD, t: LayerTokens) -> np.ndarray:
    """NetVLAD from its definition, per image and per cluster, in float64."""
    c = head.config
    weight = head.assign.weight.detach().double().numpy()[:, :, 0]
    bias = head.assign.bias.detach().double().numpy()
    centroids = head.centroids.detach().double().numpy()
    out = []
    for b in range(t.patches.shape[0]):
        x = t.patches[b].flatten(1).double().numpy()  # [C, n]
        x = x / np.linalg.norm(x, axis=0, keepdims=True)
        logits = weight @ x + bias[:, None]
        a = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
        parts = []
        for k in range(c.num_clusters):
            v = (a[k][None, :] * (x - centroids[k][:, None])).sum(1)
            parts.append(v / np.linalg.norm(v))
        if c.concat_cls:
            cls = t.cls[b].double().numpy()
            parts.append(cls / np.linalg.norm(cls))
        d = np.concatenate(parts)
        d = d / np.linalg.norm(d)
        if head.projection is not None:
            d = head.projection.weight.detach().double().numpy() @ d + head.projection.bias.detach().double().numpy()
            d = d / np.linalg.norm(d)
        out.append(d)
    return np.stack(out)


@pytest.mark.parametrize("concat_cls", [False, True])
@pytest.mark.parametrize("out_dim", [7, None])
@pytest.mark.parametrize("hw", [(3, 4), (1, 1)])
def test_forward_matches_the_definition(concat_cls, out_dim, hw):
    torch.manual_seed(0)
    head = NetVLAD(NetVLADConfig(num_channels=6, num_clusters=4, out_dim=out_dim, concat_cls=concat_cls))
    t = tokens(2, 6, *hw)
    with torch.no_grad():
        got = head(t)
    assert got.dtype == torch.float32 and got.shape == (2, head.out_dim)
    assert head.out_dim == (out_dim or 4 * 6 + (6 if concat_cls else 0))
    assert torch.allclose(got.norm(dim=1), torch.ones(2), atol=1e-5)
    np.testing.assert_allclose(got.double().numpy(), reference_descriptor(head, t), atol=2e-5)


def test_default_head_on_dinov2_s_tokens_gives_1024_and_gradients_flow():
    head = NetVLAD(NetVLADConfig(num_channels=384))
    out = head(tokens(2, 384, 4, 4))
    assert out.shape == (2, 1024)
    out.sum().backward()
    assert head.centroids.grad is not None and head.assign.weight.grad.abs().sum() > 0
    description = head.describe()
    assert description == json.loads(json.dumps(description)) and description["kind"] == "netvlad"


def blobs(seed: int = 0, k: int = 4, per: int = 50, channels: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` tight clusters on the unit sphere, far apart: (points [k*per, C], centres [k, C])."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(channels)[:k] * 3.0
    points = centres.repeat_interleave(per, 0) + 0.05 * torch.randn(k * per, channels, generator=g)
    return points, centres


def test_kmeans_finds_separated_blobs():
    points, centres = blobs()
    found = kmeans(points, 4, iters=10, seed=3)
    nearest = torch.cdist(centres, found).min(dim=1).values
    assert torch.all(nearest < 0.05)


def test_kmeans_needs_enough_points_and_survives_duplicates():
    with pytest.raises(ValueError):
        kmeans(torch.randn(3, 2), 4)
    same = torch.ones(10, 2)  # every cluster but one loses its members: no NaN
    assert torch.isfinite(kmeans(same, 3)).all()


def test_init_from_features_assigns_each_blob_to_its_own_cluster():
    points, _ = blobs()
    head = NetVLAD(NetVLADConfig(num_channels=8, num_clusters=4, out_dim=None))
    alpha = head.init_from_features(points, seed=1)
    x = torch.nn.functional.normalize(points, dim=1)
    with torch.no_grad():
        assign = head.soft_assign(x.T[None])[0]  # [K, N]
    expected = torch.softmax(-alpha * torch.cdist(x, head.centroids).pow(2), dim=1).T
    assert torch.allclose(assign, expected, atol=1e-5)  # the init reproduces softmax(-alpha d^2)
    labels = assign.argmax(0).reshape(4, 50)
    assert all(len(set(row.tolist())) == 1 for row in labels)  # each blob to one cluster
    assert len({int(row[0]) for row in labels}) == 4  # and different blobs to different clusters
    top2 = assign.topk(2, dim=0).values
    assert math.isclose(float((top2[0] / top2[1]).log().mean()), math.log(100.0), rel_tol=0.05)


def test_init_from_features_rejects_wrong_width():
    head = NetVLAD(NetVLADConfig(num_channels=8, num_clusters=4))
    with pytest.raises(ValueError):
        head.init_from_features(torch.randn(40, 5))
