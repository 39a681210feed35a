"""Training-free heads: turn a backbone's tokens into one global descriptor.

A head is a list of *pools*, each reading one block's tokens, concatenated with weights and
L2-normalised. That one shape covers every zero-shot descriptor we compare:

* ``cls``    — the class token;
* ``gem``    — generalised mean over patch tokens (Radenović et al.);
* ``swrmac`` — VFM-Loc's Scale-Weighted R-MAC: at level ``l`` the token grid is cut into ``l x l``
  regions (any grid shape: rows and columns are split separately), each region is GeM-pooled and
  L2-normalised, and the regions of level ``l`` are summed with weight ``1 / l**level_power``;
* multi-layer (hierarchical) pooling is simply several pools on different blocks.

**Signed tokens.** ViT tokens are signed. VFM-Loc's GeM clamps them to ``eps`` before the power,
which silently turns every negative activation into ~0: it keeps only "how much of the positive
half" each channel has. ``signed="signed"`` uses the signed power mean
``sign(m)|m|^(1/p)`` with ``m = mean(sign(x)|x|^p)`` instead, which keeps both halves and reduces
to the arithmetic mean at p=1; ``"abs"`` pools magnitudes only. ``cvgl bench longmont``
measures the three.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cvgl.models.backbone import LayerTokens
from cvgl.models.presets import HeadConfig, PoolSpec

EPS = 1e-6


def disc_mask(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """1 for token cells whose centre lies in the disc inscribed in the grid, else 0.

    Pooling only inside the disc makes a descriptor insensitive to what a rotation moves into
    or out of the corners (black fill on a rotated photo), so heading hypotheses compare like
    with like against north-up tiles pooled the same way.
    """
    rows = torch.arange(h, device=device, dtype=torch.float32) + 0.5 - h / 2
    cols = torch.arange(w, device=device, dtype=torch.float32) + 0.5 - w / 2
    radius = min(h, w) / 2
    return ((rows[:, None] ** 2 + cols[None, :] ** 2) <= radius**2).float()


def gem(patches: torch.Tensor, p: float = 3.0, signed: str = "clamp", mask: torch.Tensor | None = None) -> torch.Tensor:
    """GeM over the spatial dims of ``[B, C, h, w]`` -> ``[B, C]``. See module doc for ``signed``.

    ``mask`` (``[h, w]`` of 0/1) restricts the mean to some cells.
    """
    x = patches.flatten(2)
    if signed == "clamp":
        powered = x.clamp(min=EPS).pow(p)
    elif signed == "abs":
        powered = x.abs().clamp(min=EPS).pow(p)
    elif signed == "signed":
        powered = x.sign() * x.abs().pow(p)
    else:
        raise ValueError(f"unknown GeM sign handling '{signed}' (clamp | signed | abs)")
    if mask is None:
        m = powered.mean(-1)
    else:
        weights = mask.flatten().to(powered.dtype)
        m = (powered * weights).sum(-1) / weights.sum().clamp(min=1.0)
    if signed == "signed":
        return m.sign() * m.abs().clamp(min=EPS).pow(1.0 / p)
    return m.pow(1.0 / p)  # m >= EPS**p already: inputs were clamped to EPS


def region_bounds(size: int, parts: int) -> list[tuple[int, int]]:
    """Split ``size`` cells into ``parts`` contiguous, non-empty, near-equal ranges."""
    parts = min(parts, size)
    edges = [round(i * size / parts) for i in range(parts + 1)]
    return [(edges[i], edges[i + 1]) for i in range(parts)]


def sw_rmac(
    patches: torch.Tensor,
    levels: tuple[int, ...] = (1, 2),
    level_power: float = 6.0,
    p: float = 3.0,
    signed: str = "clamp",
) -> torch.Tensor:
    """Scale-Weighted R-MAC over ``[B, C, h, w]`` -> ``[B, C]`` (not normalised)."""
    h, w = patches.shape[-2:]
    total = torch.zeros(patches.shape[:2], dtype=patches.dtype, device=patches.device)
    for level in levels:
        weight = 1.0 / float(level) ** level_power
        for r0, r1 in region_bounds(h, level):
            for c0, c1 in region_bounds(w, level):
                region = gem(patches[:, :, r0:r1, c0:c1], p=p, signed=signed)
                total = total + weight * F.normalize(region, dim=-1)
    return total


def pool_tokens(spec: PoolSpec, tokens: LayerTokens) -> torch.Tensor:
    """Apply one :class:`PoolSpec` to one block's tokens -> ``[B, C]`` (not normalised)."""
    if spec.kind == "cls":
        return tokens.cls
    if spec.kind == "gem":
        mask = None
        if spec.region == "disc":
            mask = disc_mask(*tokens.patches.shape[-2:], device=tokens.patches.device)
        return gem(tokens.patches, spec.p, spec.signed, mask)
    if spec.kind == "swrmac":
        return sw_rmac(tokens.patches, spec.levels, spec.level_power, spec.p, spec.signed)
    raise ValueError(f"unknown pooling '{spec.kind}' (cls | gem | swrmac)")


class PoolingHead(nn.Module):
    """Parameter-free head applying a :class:`HeadConfig` to per-layer tokens."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        if not config.pools:
            raise ValueError("a head needs at least one pool")
        self.config = config

    @property
    def layers(self) -> list[int]:
        return sorted({pool.layer for pool in self.config.pools})

    @property
    def final_norm(self) -> bool:
        return self.config.final_norm

    def forward(self, tokens: dict[int, LayerTokens]) -> torch.Tensor:
        parts = [pool.weight * F.normalize(pool_tokens(pool, tokens[pool.layer]), dim=-1) for pool in self.config.pools]
        return F.normalize(torch.cat(parts, dim=-1), dim=-1)
