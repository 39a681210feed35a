"""A trained head that starts as the zero-shot descriptor and learns a correction on top of it.

Why: a SALAD head from random initialisation starts far below the training-free default
(``gem-l8-raw``: GeM p=3 over block-8 patch tokens) and, with the few hundred steps a CPU can
afford, never catches up (``docs/training.md``). This head keeps that descriptor as its
starting point and adds what the trained head (SALAD, NetVLAD or CLS) contributes through a
zero-initialised linear map::

    d = normalize(E · normalize(GeM_p(patches)) + W · base(LayerNorm(tokens)))

``E`` (``C -> out_dim``, no bias) starts as the identity padded with zeros, which keeps every
inner product, so at step 0 the ranking is exactly the zero-shot one; ``W`` starts at zero, so
the base head is not yet seen but receives gradient from the first step (as a zero-initialised
adapter does). The head reads the raw tokens of its block (the zero-shot pooling does) and gives
the base head its own LayerNorm, since the backbone's final norm was trained for the last block.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cvgl.models.backbone import LayerTokens
from cvgl.models.heads import gem


@dataclass
class ResidualConfig:
    num_channels: int
    out_dim: int
    p: float = 3.0  # GeM power of the zero-shot path (gem-l8-raw's)


class ResidualHead(nn.Module):
    """``normalize(E·GeM + W·base)`` with ``E`` = padded identity and ``W`` = 0 at the start."""

    def __init__(self, config: ResidualConfig, base: nn.Module) -> None:
        super().__init__()
        c = config
        if c.out_dim < c.num_channels:
            raise ValueError(f"a residual head needs out_dim >= {c.num_channels} channels (got {c.out_dim})")
        self.config = config
        self.base = base
        self.norm = nn.LayerNorm(c.num_channels)
        self.embed = nn.Linear(c.num_channels, c.out_dim, bias=False)
        self.correction = nn.Linear(base.out_dim, c.out_dim)
        with torch.no_grad():
            self.embed.weight.copy_(torch.eye(c.out_dim, c.num_channels))
            self.correction.weight.zero_()
            self.correction.bias.zero_()

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    def describe(self) -> dict:
        return {"kind": "residual", **asdict(self.config), "base": self.base.describe()}

    def zero_shot(self, tokens: LayerTokens) -> torch.Tensor:
        """The training-free descriptor of these raw tokens (``gem-l8-raw`` when they are block 8's)."""
        return F.normalize(gem(tokens.patches.float(), self.config.p), dim=1)

    def normed(self, tokens: LayerTokens) -> LayerTokens:
        """The tokens the base head reads: this head's LayerNorm over channels."""
        patches = self.norm(tokens.patches.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return LayerTokens(cls=self.norm(tokens.cls), patches=patches)

    def forward(self, tokens: LayerTokens) -> torch.Tensor:
        start = self.embed(self.zero_shot(tokens))
        return F.normalize(start + self.correction(self.base(self.normed(tokens))), dim=1).float()


__all__ = ["ResidualConfig", "ResidualHead"]
