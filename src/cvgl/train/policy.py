"""Training policy: which backbone parameters train (GenGeo fine-tunes the last blocks)."""

from __future__ import annotations

from cvgl.errors import InputError
from cvgl.models.backbone import DinoV2
from cvgl.models.presets import FINETUNE_MODES as MODES


def set_trainable(backbone: DinoV2, mode: str, n: int = 4) -> int:
    """Choose which backbone parameters train; returns how many parameters now require grad.

    ``frozen``: none. ``full``: all. ``last_n``: the last ``n`` transformer blocks and the final
    LayerNorm (whose output every head reads); patch and position embeddings, the CLS/register
    tokens and the earlier blocks stay frozen, keeping DINOv2's general low-level features.
    The head is not touched: it always trains. (A frozen backbone can also run under
    ``torch.no_grad()`` to save memory; that is the training loop's call.)
    """
    if mode not in MODES:
        raise InputError(f"unknown fine-tuning mode '{mode}'; expected {' | '.join(MODES)}")
    if mode == "last_n" and not 1 <= n <= backbone.depth:
        raise InputError(f"last_n fine-tuning needs 1 <= n <= {backbone.depth} blocks, got n={n}")
    backbone.requires_grad_(mode == "full")
    if mode == "last_n":
        for block in backbone.blocks[-n:]:
            block.requires_grad_(True)
        backbone.norm.requires_grad_(True)
    return sum(p.numel() for p in backbone.parameters() if p.requires_grad)
