"""Symmetric InfoNCE with a learnable temperature (CLIP / Sample4Geo / GenGeo Sec. 3.4.1).

For a batch of ``B`` matching pairs ``(q_i, r_i)`` of L2-normalised descriptors, each query must
pick its reference among all references of the batch and vice versa:
``L = (CE(s q r^T, i) + CE(s r q^T, i)) / 2`` with ``s = 1 / T`` the logit scale.

The scale is learnt as ``logit_scale = log(1 / T)`` (initial ``T = 0.07``) and its exponential is
clamped to ``[1, 100]``, i.e. ``T`` stays in ``[0.01, 1]``; outside that range the scale gets no
gradient, as in CLIP. Targets use label smoothing 0.1 by default, as Sample4Geo.

**Several processes (DDP).** Each process passes its local ``q``, ``r`` ``[B, D]`` plus the
descriptors all-gathered from every process, ``q_all``, ``r_all`` ``[B_total, D]``, and
``offset``, the index of its first row in the gathered tensors: local query ``i`` is scored
against all ``B_total`` references with target ``offset + i`` (and local references against all
queries). The gathered tensors must hold this process's own rows at ``[offset, offset + B)`` and
should carry gradients (``torch.distributed.nn.functional.all_gather``, or a plain all_gather
with the local slice replaced by ``q``/``r``); the mean of the per-process losses then equals
the single-process loss on the whole batch.

**Wrong-heading negatives** (``wrong``, ``[B, D]``, optional): query ``i``'s photo turned to a
heading it was not taken at. A heading-unknown ``locate`` answers with the best (heading, tile)
score, so a wrong heading that finds some other tile is as bad as a wrong tile. Row ``i`` of the
query-to-reference term also scores ``wrong_i`` against every reference except its own (a wrong
heading on the right tile still gives the right place), so the right pair must beat both. The
reference-to-query term is unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_SCALE = 100.0  # T >= 0.01
MIN_SCALE = 1.0  # T <= 1


class SymmetricInfoNCE(nn.Module):
    """``forward(q, r, q_all=None, r_all=None, offset=0, wrong=None) -> scalar loss``."""

    def __init__(self, init_temperature: float = 0.07, label_smoothing: float = 0.1) -> None:
        super().__init__()
        if not 1.0 / MAX_SCALE <= init_temperature <= 1.0 / MIN_SCALE:
            raise ValueError(f"init_temperature must be in [0.01, 1], got {init_temperature}")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.label_smoothing = label_smoothing

    @property
    def scale(self) -> torch.Tensor:
        """``1 / T``, clamped to ``[1, 100]``."""
        return self.logit_scale.exp().clamp(MIN_SCALE, MAX_SCALE)

    def forward(
        self,
        q: torch.Tensor,
        r: torch.Tensor,
        q_all: torch.Tensor | None = None,
        r_all: torch.Tensor | None = None,
        offset: int = 0,
        wrong: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if q.shape != r.shape or q.ndim != 2:
            raise ValueError(f"q and r must both be [B, D], got {tuple(q.shape)} and {tuple(r.shape)}")
        q_all = q if q_all is None else q_all
        r_all = r if r_all is None else r_all
        batch = q.shape[0]
        for name, gathered in (("q_all", q_all), ("r_all", r_all)):
            if gathered.ndim != 2 or gathered.shape[1] != q.shape[1] or not 0 <= offset <= gathered.shape[0] - batch:
                raise ValueError(f"{name} {tuple(gathered.shape)} cannot hold {batch} local rows at offset {offset}")
        targets = torch.arange(batch, device=q.device) + offset
        scale = self.scale
        logits = scale * q @ r_all.T
        if wrong is not None:
            if wrong.shape != q.shape:
                raise ValueError(f"wrong must be [B, D] like q {tuple(q.shape)}, got {tuple(wrong.shape)}")
            others = ~F.one_hot(targets, r_all.shape[0]).bool()  # every reference but the photo's own
            wrong_logits = (scale * wrong @ r_all.T)[others].view(batch, r_all.shape[0] - 1)
            logits = torch.cat([logits, wrong_logits], dim=1)
        query_to_reference = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        reference_to_query = F.cross_entropy(scale * r @ q_all.T, targets, label_smoothing=self.label_smoothing)
        return (query_to_reference + reference_to_query) / 2


__all__ = ["SymmetricInfoNCE"]
