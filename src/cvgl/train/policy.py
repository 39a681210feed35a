"""Training policy: which backbone parameters train (GenGeo fine-tunes the last blocks)."""

from __future__ import annotations

from cvgl.errors import InputError
from cvgl.models.backbone import DinoV2
from cvgl.models.presets import FINETUNE_MODES as MODES


def set_trainable(backbone: DinoV2, mode: str, n: int = 4, block: int = -1, final_norm: bool = True) -> int:
    """Choose which backbone parameters train; returns how many parameters now require grad.

    ``frozen``: none. ``full``: all. ``last_n``: the last ``n`` transformer blocks and the final
    LayerNorm (whose output every head reads); patch and position embeddings, the CLS/register
    tokens and the earlier blocks stay frozen, keeping DINOv2's general low-level features.
    The head is not touched: it always trains. (A frozen backbone can also run under
    ``torch.no_grad()`` to save memory; that is the training loop's call.)

    ``block``: the block the head reads (1-based, -1 = last). ``last_n`` then means the ``n``
    blocks up to and including it; blocks after it never run and stay frozen in every mode, and
    the final LayerNorm trains only when the head reads it (``final_norm``).
    """
    if mode not in MODES:
        raise InputError(f"unknown fine-tuning mode '{mode}'; expected {' | '.join(MODES)}")
    try:
        top = backbone.resolve_layer(block)
    except ValueError:
        raise InputError(f"model.block {block} is not a block of this {backbone.depth}-block backbone") from None
    if mode == "last_n" and not 1 <= n <= top:
        raise InputError(f"last_n fine-tuning needs 1 <= n <= {top} blocks (up to block {top}), got n={n}")
    backbone.requires_grad_(mode == "full")
    for unused in backbone.blocks[top:]:
        unused.requires_grad_(False)
    if mode == "last_n":
        for trained in backbone.blocks[top - n : top]:
            trained.requires_grad_(True)
    backbone.norm.requires_grad_(mode != "frozen" and final_norm)
    return sum(p.numel() for p in backbone.parameters() if p.requires_grad)
