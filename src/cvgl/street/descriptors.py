"""Descriptors for geometric street↔aerial matching: DINOv2 tokens per azimuth column and per BEV cell.

* **Column descriptors** (panorama and polar aerial): block-8 tokens, GeM over the token rows of each
  column, each image's mean column subtracted (the part every column shares — "street photo" vs
  "aerial" — is what the two views do NOT share; without it R@10 halves), each column
  L2-normalised. Comparing two images is the mean cosine of corresponding columns.
* **Token maps** (BEV and aerial): block-8 tokens, each map's mean token (over its valid cells)
  subtracted, each cell L2-normalised; a BEV map is slid over an aerial map (``conv2d``) and the
  score at each offset is the mean cosine over the BEV's valid cells.

Tokens are taken before the backbone's final LayerNorm, as in the project's default ``gem-l8-raw``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cvgl.models.backbone import PATCH, DinoV2
from cvgl.models.heads import gem

__all__ = [
    "TokenExtractor",
    "column_descriptors",
    "column_scores",
    "column_shift_scores",
    "normalise_token_map",
    "resize_to",
    "token_map_scores",
]


class TokenExtractor:
    """Patch tokens ``[B, C, h, w]`` of one DINOv2 block for float images in 0..255 of any size (multiples of 14).

    Build it from an encoder (:meth:`from_encoder`: its backbone and its input normalisation) so the
    street products use exactly the weights and normalisation the index records.
    """

    def __init__(
        self, backbone: DinoV2, mean: Sequence[float], std: Sequence[float], layer: int = 8, batch: int = 8
    ) -> None:
        self.backbone = backbone.eval()
        self.layer = backbone.resolve_layer(layer)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.batch = batch

    @classmethod
    def from_encoder(cls, encoder, layer: int = 8, batch: int = 8) -> TokenExtractor:
        """From any :class:`~cvgl.models.encoder.Encoder` (``.backbone``, ``.mean``, ``.std``)."""
        return cls(encoder.backbone, encoder.mean.flatten().tolist(), encoder.std.flatten().tolist(), layer, batch)

    @property
    def dim(self) -> int:
        return int(self.backbone.embed_dim)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: ``[B, 3, H, W]`` float 0..255, H and W multiples of 14 -> ``[B, C, H/14, W/14]`` float32."""
        if images.shape[-1] % PATCH or images.shape[-2] % PATCH:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of {PATCH}")
        out = []
        for start in range(0, images.shape[0], self.batch):
            x = (images[start : start + self.batch].float() / 255.0 - self.mean) / self.std
            out.append(self.backbone.forward_layers(x, [self.layer], norm=False)[self.layer].patches.float())
        return torch.cat(out)


def resize_to(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of ``[B, C, H, W]`` to ``size`` (height, width)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def column_descriptors(tokens: torch.Tensor, p: float = 3.0, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, C, h, w]`` tokens -> ``[B, w, C]`` column descriptors (see module doc).

    ``valid``: optional ``[B, w]`` bool, the columns that show something (a perspective photo covers
    only part of the panorama): the mean column is taken over them and the others are set to 0.
    """
    b, c, h, w = tokens.shape
    per_column = tokens.permute(0, 3, 1, 2).reshape(b * w, c, h, 1)
    pooled = gem(per_column, p=p).reshape(b, w, c)
    weights = torch.ones(b, w, 1) if valid is None else valid.reshape(b, w, 1).float()
    mean = (pooled * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1.0)
    return F.normalize(pooled - mean, dim=-1) * weights


def column_scores(query: torch.Tensor, reference: torch.Tensor, query_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cosine of corresponding columns: ``[Q, w, C]`` x ``[N, w, C]`` -> ``[Q, N]``.

    ``query_valid`` ``[Q, w]`` restricts the mean to the query's valid columns (zeroed columns of a
    partial panorama contribute 0 and are not counted).
    """
    count = torch.full((query.shape[0],), float(query.shape[1])) if query_valid is None else query_valid.float().sum(1).clamp(min=1.0)
    return torch.einsum("qwc,nwc->qn", query, reference) / count[:, None]


def column_shift_scores(query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Scores of every circular column shift: ``[w, C]`` x ``[N, w, C]`` -> ``[N, w]``.

    ``out[n, s] = mean_j <query[j], reference[n, (j + s) mod w]>``: the query turned ``s`` columns
    clockwise (a heading of ``s * 360 / w`` degrees). Cheap (one encoding), but it compares tokens
    at different positions of the ViT's grid, whose position embeddings differ.
    """
    w = query.shape[0]
    rolled = torch.stack([torch.roll(query, shifts=s, dims=0) for s in range(w)])  # rolled[s][j+s] = query[j]
    return torch.einsum("swc,nwc->ns", rolled, reference) / w


def normalise_token_map(tokens: torch.Tensor, mask: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """Centre (mean over the masked cells) and L2-normalise each cell of ``[B, C, h, w]``; cells outside ``mask`` -> 0."""
    b, c, h, w = tokens.shape
    weights = torch.ones(1, 1, h, w) if mask is None else torch.as_tensor(np.asarray(mask), dtype=torch.float32).reshape(1, 1, h, w)
    mean = (tokens * weights).sum((2, 3), keepdim=True) / weights.sum().clamp(min=1.0)
    return F.normalize(tokens - mean, dim=1) * weights


def token_map_scores(bev: torch.Tensor, aerial: torch.Tensor, cells: int) -> torch.Tensor:
    """Slide normalised BEV maps over normalised aerial maps: ``[K, C, hb, wb]`` x ``[N, C, ha, wa]`` ->
    ``[N, K, ha - hb + 1, wa - wb + 1]`` mean cosine over the BEV's ``cells`` valid cells.

    Offset ``(dy, dx)`` puts the BEV's top-left cell on aerial cell ``(dy, dx)``; the centred offset
    ``((ha - hb) / 2, (wa - wb) / 2)`` is "camera at the aerial map's centre".
    """
    return F.conv2d(aerial, bev) / float(max(cells, 1))
