"""Trainable heads (SALAD, NetVLAD, CLS) behind one spec, and per-view heads.

GenGeo's ablations vary three things; this module makes the first two one-line choices:

* the head (``HeadSpec.kind``): SALAD (default), NetVLAD, or the CLS token alone;
* whether ground and aerial views share it (``HeadSpec.shared``; GenGeo shares, the
  "SALAD non-shared" ablation gives each view its own): :class:`ViewHeads`;
* how much of the DINOv2 backbone is trained is training policy:
  :func:`cvgl.train.policy.set_trainable`.

Every head has ``describe() -> dict`` (JSON-able, with ``kind``) and
:func:`head_from_description` rebuilds an untrained head of the same shape from it, so a
checkpoint can store ``describe()`` beside the state dict.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from cvgl.errors import InputError
from cvgl.models.backbone import LayerTokens
from cvgl.models.netvlad import NetVLAD, NetVLADConfig
from cvgl.models.presets import HEAD_KINDS
from cvgl.models.residual_head import ResidualConfig, ResidualHead
from cvgl.models.salad import Salad, SaladConfig

BRANCHES = ("query", "reference")  # the two branches of a Siamese model (not camera views)


class ClsHead(nn.Module):
    """The "CLS-only fine-tune" baseline: the normalised CLS token, optionally projected."""

    def __init__(self, num_channels: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.projection = nn.Linear(num_channels, out_dim) if out_dim else None

    @property
    def out_dim(self) -> int:
        return self.projection.out_features if self.projection is not None else self.num_channels

    def describe(self) -> dict:
        out_dim = self.projection.out_features if self.projection is not None else None
        return {"kind": "cls", "num_channels": self.num_channels, "out_dim": out_dim}

    def forward(self, tokens: LayerTokens) -> torch.Tensor:
        descriptor = F.normalize(tokens.cls, dim=1)
        if self.projection is not None:
            descriptor = F.normalize(self.projection(descriptor), dim=1)
        return descriptor.float()


@dataclass
class HeadSpec:
    """Which trainable head to build. Fields a kind does not use are ignored by it."""

    kind: str = "salad"  # salad | netvlad | cls
    num_clusters: int = 64
    cluster_dim: int = 128  # SALAD only
    token_dim: int = 256  # SALAD only
    dustbin: bool = True  # SALAD only
    out_dim: int | None = 1024
    shared: bool = True  # one head for both views (GenGeo) or one per view
    dropout: float = 0.3  # SALAD only
    sinkhorn_iters: int = 3  # SALAD only
    concat_cls: bool = False  # NetVLAD only
    residual: bool = False  # wrap the head in a ResidualHead (starts as the zero-shot GeM descriptor)


def build_head(spec: HeadSpec, num_channels: int) -> nn.Module:
    """One freshly initialised head of ``spec.kind`` for tokens of width ``num_channels``.

    ``spec.residual``: the head is the correction of a :class:`ResidualHead` of ``spec.out_dim``
    dimensions (the base then keeps its own width: the residual head's map compresses it).
    """
    if spec.residual:
        out_dim = spec.out_dim or num_channels
        base = build_head(replace(spec, residual=False, out_dim=None), num_channels)
        return ResidualHead(ResidualConfig(num_channels, out_dim), base)
    if spec.kind == "salad":
        return Salad(
            SaladConfig(
                num_channels=num_channels,
                num_clusters=spec.num_clusters,
                cluster_dim=spec.cluster_dim,
                token_dim=spec.token_dim,
                dropout=spec.dropout,
                dustbin=spec.dustbin,
                out_dim=spec.out_dim,
                sinkhorn_iters=spec.sinkhorn_iters,
            )
        )
    if spec.kind == "netvlad":
        return NetVLAD(NetVLADConfig(num_channels, spec.num_clusters, spec.out_dim, spec.concat_cls))
    if spec.kind == "cls":
        return ClsHead(num_channels, spec.out_dim)
    raise InputError(f"unknown head kind '{spec.kind}'; expected {' | '.join(HEAD_KINDS)}")


def head_from_description(description: dict) -> nn.Module:
    """Rebuild (untrained) the head whose ``describe()`` gave ``description``."""
    config = dict(description)
    kind = config.pop("kind", None)
    try:
        if kind == "residual":
            base = head_from_description(config.pop("base"))
            return ResidualHead(ResidualConfig(**config), base)
        if kind == "salad":
            return Salad(SaladConfig(**config))
        if kind == "netvlad":
            return NetVLAD(NetVLADConfig(**config))
        if kind == "cls":
            return ClsHead(**config)
    except TypeError as error:
        raise InputError(f"head description {description} does not fit a '{kind}' head: {error}") from None
    raise InputError(f"unknown head kind '{kind}' in head description; expected {' | '.join(HEAD_KINDS)}")


class ViewHeads(nn.Module):
    """The head(s) of a two-view model: one shared head, or one for queries and one for references.

    Shared is GenGeo's default (one set of clusters for ground and aerial tokens); the separate
    pair exists for the "SALAD non-shared" ablation.
    """

    def __init__(self, query: nn.Module, reference: nn.Module | None = None) -> None:
        super().__init__()
        self.query = query
        self.reference = reference  # None: the query head serves both views

    @classmethod
    def build(cls, spec: HeadSpec, num_channels: int) -> ViewHeads:
        """Shared or per-view heads as ``spec.shared`` says (per-view heads start different)."""
        query = build_head(spec, num_channels)
        return cls(query, None if spec.shared else build_head(spec, num_channels))

    @property
    def shared(self) -> bool:
        return self.reference is None

    @property
    def out_dim(self) -> int:
        return self.query.out_dim

    def head(self, view: str) -> nn.Module:
        if view not in BRANCHES:
            raise ValueError(f"unknown view '{view}'; expected query | reference")
        return self.reference if view == "reference" and self.reference is not None else self.query

    def forward(self, tokens: LayerTokens, view: str) -> torch.Tensor:
        return self.head(view)(tokens)

    def describe(self) -> dict:
        description = {"query": self.query.describe()}
        if self.reference is not None:
            description["reference"] = self.reference.describe()
        return description

    @classmethod
    def from_description(cls, description: dict) -> ViewHeads:
        reference = description.get("reference")
        return cls(
            head_from_description(description["query"]),
            None if reference is None else head_from_description(reference),
        )


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode (dropout off) for the block, then back in the mode it was in."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


__all__ = [
    "eval_mode",
    "BRANCHES",
    "ClsHead",
    "HeadSpec",
    "ViewHeads",
    "build_head",
    "head_from_description",
]
