"""SALAD: optimal-transport aggregation of patch tokens with a dustbin (GenGeo's trained head).

Follows Izquierdo & Civera, "Optimal Transport Aggregation for Visual Place Recognition"
(CVPR 2024), as reinterpreted by GenGeo (Sec. 3.3):

1. *Assignment.* A small MLP scores each patch token against ``M`` learnt clusters,
   ``S [B, M, n]``. A learnable scalar ``z`` (SuperGlue's dustbin) is appended as row ``M+1``.
   A few log-domain Sinkhorn iterations on ``exp(S)`` find the transport plan ``P`` whose
   per-feature sums are the feature masses ``mu = 1_n`` and whose per-cluster sums approach
   ``kappa = [1_M, n - M]``: every cluster may take about one feature's worth of mass and the
   dustbin absorbs the rest, so each cluster is *competitive* and features that fit no cluster
   (sky, cars, view-specific clutter) are discarded.
2. *Aggregation.* The dustbin row is dropped; another MLP projects tokens to ``l`` dims and each
   cluster sums them weighted by the plan (no VLAD residuals), ``V_m = sum_i P[m, i] f_i``.
   Clusters are L2-normalised one by one, flattened, concatenated with a projection of the CLS
   token, L2-normalised, and (GenGeo) linearly compressed to ``out_dim`` and normalised again.

**Few tokens (n <= M).** The paper's dustbin mass ``n - M`` is then zero or negative, which has
no transport solution. We give the dustbin ``d = max(n - M, min_dustbin_fraction * n)`` and the
clusters ``(n - d) / M`` each, so both sides still sum to ``n`` and every feature keeps unit mass
(the dustbin weight of a feature stays a fraction in ``[0, 1]``). For ``n >= M / (1 - fraction)``
this *is* the paper's ``[1_M, n - M]``, and it is continuous at the switch.

**What the dustbin scalar can and cannot do.** Adding a constant to a whole row of the score
matrix is absorbed by that row's Sinkhorn scaling, and the dustbin row *is* the constant ``z``:
the converged plan does not depend on ``z`` at all; the dustbin's share is fixed by the
marginals, and which tokens fill it is decided by how strongly the (competing, unit-mass)
clusters claim them. SALAD's code scales the cluster side first, which cancels ``z`` exactly at
every iteration (zero gradient). We scale the feature side first (each token's softmax over
the ``M`` cluster scores and ``z``: the paper's "rejection threshold"), so ``z`` shapes the
first iterations; with the default 3 iterations its influence is already small (measured on
random scores: ~1e-6 on the dustbin weights) and it vanishes with more iterations.
``sinkhorn_iters=0`` gives the plain softmax with a dustbin, where ``z`` is a real threshold.

**Without dustbin** (the GenGeo ablation) we run the same Sinkhorn over the ``M`` clusters with
balanced marginals ``n / M`` each, rather than a plain softmax, so the only difference from the
default is the dustbin itself (a softmax would also drop the competition between clusters).

The plan is computed in float32 (or float64) whatever the input dtype: a few log-sum-exps over
``n`` tokens are cheap and half precision would break the marginals. The descriptor is float32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cvgl.models.backbone import LayerTokens

HIDDEN = 512  # width of SALAD's score / feature / token MLPs


@dataclass
class SaladConfig:
    """Everything needed to rebuild a :class:`Salad` head (``Salad.describe`` writes it out)."""

    num_channels: int
    num_clusters: int = 64
    cluster_dim: int = 128
    token_dim: int = 256
    dropout: float = 0.3
    dustbin: bool = True
    out_dim: int | None = 1024
    sinkhorn_iters: int = 3
    min_dustbin_fraction: float = 0.1  # dustbin share of the mass when n - M would be smaller


@dataclass
class SaladAssignments:
    """Where each patch token went, for the paper's Fig. 4 (dustbin) and Fig. 7 (clusters).

    ``plan``: ``[B, M(+1), n]`` transport plan (row ``M`` is the dustbin when there is one);
    every column sums to 1 (each token's unit mass).
    ``dustbin_weight``: ``[B, h, w]`` mass each token sent to the dustbin, ``w`` in ``[0, 1]``
    (the paper's selection map is ``1 - w``); zeros without a dustbin.
    ``cluster_probs``: ``[B, M, h, w]`` mass each token sent to each cluster; with the dustbin
    weight it sums to 1 per token (divide by ``1 - w`` for the distribution over clusters only).
    """

    plan: torch.Tensor
    dustbin_weight: torch.Tensor
    cluster_probs: torch.Tensor


def transport_marginals(
    num_clusters: int, num_features: int, dustbin: bool, min_dustbin_fraction: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cluster-side masses ``[M(+1)]``, feature-side masses ``[n]``), both summing to ``n``.

    See the module docstring for the rule when ``n <= M`` and for the no-dustbin case.
    """
    m, n = num_clusters, num_features
    features = torch.ones(n, dtype=torch.float64)
    if not dustbin:
        return torch.full((m,), n / m, dtype=torch.float64), features
    if not 0.0 < min_dustbin_fraction < 1.0:
        raise ValueError(f"min_dustbin_fraction must be in (0, 1), got {min_dustbin_fraction}")
    dustbin_mass = max(float(n - m), min_dustbin_fraction * n)
    clusters = torch.full((m,), (n - dustbin_mass) / m, dtype=torch.float64)
    return torch.cat([clusters, torch.tensor([dustbin_mass], dtype=torch.float64)]), features


def log_sinkhorn(
    scores: torch.Tensor, log_cluster_mass: torch.Tensor, log_feature_mass: torch.Tensor, iters: int
) -> torch.Tensor:
    """Log of the entropic transport plan for ``exp(scores)`` ``[B, R, n]`` (rows = clusters).

    Starts with a feature-side scaling (each token's softmax over the rows, times its mass),
    then ``iters`` times scales the cluster side and the feature side again. Each feature's
    column therefore sums exactly to its mass after any number of iterations (``iters=0`` is
    the plain softmax); the cluster sums converge to their masses. See the module doc for why
    the feature side goes first.
    """
    u = torch.zeros(scores.shape[:2], dtype=scores.dtype, device=scores.device)
    v = log_feature_mass - torch.logsumexp(scores, dim=1)
    for _ in range(iters):
        u = log_cluster_mass - torch.logsumexp(scores + v[:, None, :], dim=2)
        v = log_feature_mass - torch.logsumexp(scores + u[:, :, None], dim=1)
    return scores + u[:, :, None] + v[:, None, :]


def _mlp(num_channels: int, out: int, dropout: float) -> nn.Sequential:
    """1x1-conv MLP over a token map (SALAD's score and feature branches)."""
    return nn.Sequential(
        nn.Conv2d(num_channels, HIDDEN, 1), nn.Dropout(dropout), nn.ReLU(), nn.Conv2d(HIDDEN, out, 1)
    )


class Salad(nn.Module):
    """SALAD head: ``LayerTokens`` of the last block -> L2-normalised ``[B, out_dim]``."""

    def __init__(self, config: SaladConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.score = _mlp(c.num_channels, c.num_clusters, c.dropout)
        self.features = _mlp(c.num_channels, c.cluster_dim, c.dropout)
        self.token = nn.Sequential(nn.Linear(c.num_channels, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, c.token_dim))
        self.dustbin = nn.Parameter(torch.tensor(1.0)) if c.dustbin else None
        aggregated = c.num_clusters * c.cluster_dim + c.token_dim
        self.projection = nn.Linear(aggregated, c.out_dim) if c.out_dim else None

    @property
    def out_dim(self) -> int:
        c = self.config
        return c.out_dim or c.num_clusters * c.cluster_dim + c.token_dim

    def describe(self) -> dict:
        """JSON-able config; :func:`cvgl.models.trainable.head_from_description` rebuilds it."""
        return {"kind": "salad", **asdict(self.config)}

    def plan(self, patches: torch.Tensor) -> torch.Tensor:
        """Transport plan ``[B, M(+1), n]`` of the patch map ``[B, C, h, w]`` (see module doc)."""
        c = self.config
        scores = self.score(patches).flatten(2)  # [B, M, n]
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        n = scores.shape[2]
        if self.dustbin is not None:
            dust = self.dustbin.to(scores.dtype).expand(scores.shape[0], 1, n)
            scores = torch.cat([scores, dust], dim=1)
        cluster_mass, feature_mass = transport_marginals(c.num_clusters, n, c.dustbin, c.min_dustbin_fraction)
        log_cluster = cluster_mass.log().to(scores)
        log_feature = feature_mass.log().to(scores)
        return log_sinkhorn(scores, log_cluster, log_feature, c.sinkhorn_iters).exp()

    def aggregate(self, plan: torch.Tensor, tokens: LayerTokens) -> torch.Tensor:
        """Cluster sums of projected tokens + CLS projection -> the L2-normalised descriptor."""
        c = self.config
        local = self.features(tokens.patches).flatten(2)  # [B, l, n]
        weights = plan[:, : c.num_clusters].to(local.dtype)  # drop the dustbin row
        clusters = torch.einsum("bmn,bln->bml", weights, local)  # V_m = sum_i P[m, i] f_i
        clusters = F.normalize(clusters, dim=2).flatten(1)  # intra-normalisation
        cls = F.normalize(self.token(tokens.cls), dim=1)
        descriptor = F.normalize(torch.cat([clusters, cls], dim=1), dim=1)
        if self.projection is not None:
            descriptor = F.normalize(self.projection(descriptor), dim=1)
        return descriptor.float()

    def forward(self, tokens: LayerTokens) -> torch.Tensor:
        return self.aggregate(self.plan(tokens.patches), tokens)

    def assignments(self, tokens: LayerTokens) -> SaladAssignments:
        """The plan and its per-token maps (call in ``eval()`` mode to switch dropout off)."""
        c = self.config
        batch, _, h, w = tokens.patches.shape
        plan = self.plan(tokens.patches)
        clusters = plan[:, : c.num_clusters].reshape(batch, c.num_clusters, h, w)
        if self.dustbin is not None:
            dustbin = plan[:, c.num_clusters].reshape(batch, h, w)
        else:
            dustbin = plan.new_zeros(batch, h, w)
        return SaladAssignments(plan=plan, dustbin_weight=dustbin, cluster_probs=clusters)


__all__ = ["Salad", "SaladAssignments", "SaladConfig", "log_sinkhorn", "transport_marginals"]
