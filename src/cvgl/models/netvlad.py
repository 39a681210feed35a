"""NetVLAD head (Arandjelović et al. 2016): the shared-clustering baseline of GenGeo's ablation.

Patch tokens are L2-normalised, softly assigned to ``K`` clusters by a 1x1 convolution + softmax,
and each cluster sums the *residuals* to its learnt centroid,
``V_k = sum_i a_ik (x_i - c_k)``. Clusters are intra-normalised, flattened (cluster-major),
optionally concatenated with the normalised CLS token (off by default: NetVLAD proper uses
patches only), L2-normalised, linearly projected to ``out_dim`` and normalised again, like the
SALAD head, so the two differ only in how they assign and aggregate.

Unlike SALAD, NetVLAD wants its clusters initialised from data: :meth:`NetVLAD.init_from_features`
runs a few k-means iterations on sample tokens and sets the assignment so that
``softmax_k(-alpha ||x - c_k||^2)`` is reproduced exactly (the ``||x||^2`` term cancels in the
softmax, leaving weight ``2 alpha c_k`` and bias ``-alpha ||c_k||^2``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cvgl.models.backbone import LayerTokens


@dataclass
class NetVLADConfig:
    """Everything needed to rebuild a :class:`NetVLAD` head."""

    num_channels: int
    num_clusters: int = 64
    out_dim: int | None = 1024
    concat_cls: bool = False


def vlad_residuals(features: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``V[b, k] = sum_i assign[b, k, i] (features[b, :, i] - centroids[k])`` -> ``[B, K, C]``.

    ``features`` ``[B, C, n]``, ``assign`` ``[B, K, n]``, ``centroids`` ``[K, C]``. Written as
    one matmul minus the assignment mass times the centroid, never materialising ``[B, K, C, n]``.
    """
    weighted = torch.einsum("bkn,bcn->bkc", assign, features)
    return weighted - assign.sum(dim=2, keepdim=True) * centroids[None]


def kmeans(features: torch.Tensor, k: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means on ``[N, C]`` -> centroids ``[k, C]`` (torch only, seeded, CPU-cheap).

    Seeded with k-means++ (each new centre drawn with probability proportional to the squared
    distance to the nearest chosen one), so a few iterations suffice; a cluster that loses all
    its members keeps its previous centroid rather than becoming NaN.
    """
    n = features.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least {k} features, got {n}")
    generator = torch.Generator().manual_seed(seed)
    data = features.detach().float().cpu()
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest_sq = torch.cdist(data, data[chosen]).pow(2).min(dim=1).values
    for _ in range(1, k):
        weights = nearest_sq if nearest_sq.sum() > 0 else torch.ones(n)  # all duplicates: uniform
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        nearest_sq = torch.minimum(nearest_sq, (data - data[chosen[-1]]).pow(2).sum(dim=1))
    centroids = data[chosen].clone()
    for _ in range(iters):
        nearest = torch.cdist(data, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, data)
        counts = torch.bincount(nearest, minlength=k).to(data.dtype)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


class NetVLAD(nn.Module):
    """NetVLAD head: ``LayerTokens`` of the last block -> L2-normalised ``[B, out_dim]``."""

    def __init__(self, config: NetVLADConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.assign = nn.Conv1d(c.num_channels, c.num_clusters, 1)
        self.centroids = nn.Parameter(torch.rand(c.num_clusters, c.num_channels))
        aggregated = c.num_clusters * c.num_channels + (c.num_channels if c.concat_cls else 0)
        self.projection = nn.Linear(aggregated, c.out_dim) if c.out_dim else None

    @property
    def out_dim(self) -> int:
        c = self.config
        return c.out_dim or c.num_clusters * c.num_channels + (c.num_channels if c.concat_cls else 0)

    def describe(self) -> dict:
        """JSON-able config; :func:`cvgl.models.trainable.head_from_description` rebuilds it."""
        return {"kind": "netvlad", **asdict(self.config)}

    def soft_assign(self, features: torch.Tensor) -> torch.Tensor:
        """Normalised tokens ``[B, C, n]`` -> assignment ``[B, K, n]`` summing to 1 per token."""
        return self.assign(features).softmax(dim=1)

    def forward(self, tokens: LayerTokens) -> torch.Tensor:
        features = F.normalize(tokens.patches.flatten(2), dim=1)  # [B, C, n]
        vlad = vlad_residuals(features, self.soft_assign(features), self.centroids)
        descriptor = F.normalize(vlad, dim=2).flatten(1)  # intra-normalisation, cluster-major
        if self.config.concat_cls:
            descriptor = torch.cat([descriptor, F.normalize(tokens.cls, dim=1)], dim=1)
        descriptor = F.normalize(descriptor, dim=1)
        if self.projection is not None:
            descriptor = F.normalize(self.projection(descriptor), dim=1)
        return descriptor.float()

    @torch.no_grad()
    def init_from_features(self, features: torch.Tensor, iters: int = 10, seed: int = 0) -> float:
        """Set centroids and assignment from sample patch tokens ``[N, C]``; returns ``alpha``.

        Pass tokens of a few hundred training images (any subset of their patches). ``alpha`` is
        chosen so that, on average over the samples, the nearest centroid's logit
        beats the second nearest by ``log(100)`` (a confident but soft assignment at the start).
        """
        k, c = self.config.num_clusters, self.config.num_channels
        if features.ndim != 2 or features.shape[1] != c:
            raise ValueError(f"expected features [N, {c}], got {tuple(features.shape)}")
        data = F.normalize(features.detach().float().cpu(), dim=1)
        centroids = kmeans(data, k, iters=iters, seed=seed)
        squared = torch.cdist(data, centroids).pow(2).topk(2, dim=1, largest=False).values
        gap = (squared[:, 1] - squared[:, 0]).mean().clamp(min=1e-6)
        alpha = math.log(100.0) / float(gap)
        device = self.centroids.device
        self.centroids.copy_(centroids.to(device))
        self.assign.weight.copy_((2.0 * alpha * centroids)[:, :, None].to(device))
        self.assign.bias.copy_((-alpha * centroids.pow(2).sum(dim=1)).to(device))
        return alpha


__all__ = ["NetVLAD", "NetVLADConfig", "kmeans", "vlad_residuals"]
