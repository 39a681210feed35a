"""Data-dependent head initialisation before the first step of a new run.

NetVLAD sums residuals to its centroids, so it starts from k-means centroids of training patch
tokens (as the NetVLAD paper does) rather than from random ones. SALAD starts from random MLPs
(the paper) unless ``model.head_init`` is ``tokens`` (the small-data recipe): its two 1x1-conv
MLPs are then set so that, before any step, the feature branch is the PCA projection of the
tokens to ``l`` dimensions and the score branch is the scaled cosine of that projection to
k-means centroids of training tokens — the assignment a trained SALAD converges towards, reached
here without a gradient. A resumed run skips all of this: its weights are in the checkpoint.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cvgl.data.datasets.common import CrossViewSplit, load_resized
from cvgl.models.backbone import LayerTokens
from cvgl.models.gengeo import GeoModel
from cvgl.models.netvlad import NetVLAD, kmeans
from cvgl.models.residual_head import ResidualHead
from cvgl.models.salad import Salad
from cvgl.models.view_heads import eval_mode
from cvgl.train.config import TrainConfig


def init_heads(model: GeoModel, split: CrossViewSplit, config: TrainConfig, images: int = 64) -> None:
    """NetVLAD heads from k-means of tokens; SALAD heads from PCA + k-means when ``head_init: tokens``."""
    heads = [_inner(h) for h in (model.heads.query, model.heads.reference) if h is not None]
    todo = [(inner, outer) for inner, outer in heads if isinstance(inner, NetVLAD)
            or (isinstance(inner, Salad) and config.model.head_init == "tokens")]
    if not todo:
        return
    tokens = sample_tokens(model, split, config, images)
    for inner, outer in todo:
        seen = outer.normed(tokens) if isinstance(outer, ResidualHead) else tokens
        if isinstance(inner, NetVLAD):
            inner.init_from_features(_rows(seen.patches), seed=config.seed)
        else:
            init_salad_from_tokens(inner, seen, seed=config.seed)


def _inner(head: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the aggregation head, the head it sits in): a residual head's base, or the head itself."""
    return (head.base, head) if isinstance(head, ResidualHead) else (head, head)


@torch.no_grad()
def sample_tokens(model: GeoModel, split: CrossViewSplit, config: TrainConfig, images: int = 64) -> LayerTokens:
    """The head-input tokens of ``images`` training images (seeded), both views when their sizes agree."""
    pairs = split.pairs()
    pick = np.random.default_rng(config.seed).permutation(len(pairs))[:images]
    # Both views' tokens when they share an input size (a shared head clusters both), else tiles only.
    size = config.model.reference_size
    paths = [split.references[pairs[i][1]].path for i in pick]
    if config.model.query_size == size:
        half = len(pick) // 2
        paths = [split.queries[pairs[i][0]].path for i in pick[:half]] + paths[half:]
    batch = torch.stack([load_resized(path, size) for path in paths])
    with eval_mode(model):
        return model.tokens(batch)


def _rows(patches: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B*h*w, C]``."""
    return patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1])


@torch.no_grad()
def init_salad_from_tokens(salad: Salad, tokens: LayerTokens, seed: int = 0, iters: int = 10) -> None:
    """Set SALAD's score and feature MLPs from sample tokens (see the module docstring).

    Each MLP is ``conv(C->H) -> dropout -> ReLU -> conv(H->out)``. The first conv gets the top
    ``k = min(H/2, C)`` principal directions ``P`` twice, as ``+P`` and ``-P`` (centred), so that
    ``relu(z) - relu(-z) = z = P(x - mean)`` passes through the ReLU unchanged; the second conv
    reads ``z`` back: the first ``l`` components for the features, ``alpha`` times the cosine to
    ``M`` k-means centroids (of the normalised ``z``) for the scores. ``alpha`` makes the nearest
    centroid's score beat the second's by ``log(10)`` on average: a clear but soft start.
    """
    c = salad.config
    data = _rows(tokens.patches).double()
    mean = data.mean(0)
    centred = data - mean
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / len(data))
    hidden = salad.score[0].out_channels
    k = min(hidden // 2, data.shape[1])
    if c.cluster_dim > k:
        raise ValueError(f"token init needs cluster_dim <= {k} principal components (got {c.cluster_dim})")
    directions = eigenvectors[:, eigenvalues.argsort(descending=True)[:k]].T  # [k, C]
    z = centred @ directions.T  # [N, k]
    scale = z.norm(dim=1).mean().clamp(min=1e-12)
    centroids = F.normalize(kmeans(F.normalize(z, dim=1).float(), c.num_clusters, iters=iters, seed=seed).double(), dim=1)
    cosines = (z / scale) @ centroids.T
    top = cosines.topk(2, dim=1).values
    alpha = math.log(10.0) / float((top[:, 0] - top[:, 1]).mean().clamp(min=1e-6))
    read_scores = alpha * centroids / scale  # [M, k]
    read_features = torch.eye(c.cluster_dim, k, dtype=torch.float64)  # [l, k]
    for mlp, read in ((salad.score, read_scores), (salad.features, read_features)):
        first, last = mlp[0], mlp[-1]
        first.weight.zero_()
        first.bias.zero_()
        last.weight.zero_()
        last.bias.zero_()
        first.weight[:k, :, 0, 0] = directions.to(first.weight)
        first.weight[k : 2 * k, :, 0, 0] = -directions.to(first.weight)
        first.bias[:k] = -(directions @ mean).to(first.bias)
        first.bias[k : 2 * k] = (directions @ mean).to(first.bias)
        last.weight[:, :k, 0, 0] = read.to(last.weight)
        last.weight[:, k : 2 * k, 0, 0] = -read.to(last.weight)
