"""DINOv2 backbone: timm's VisionTransformer with any input size and per-layer token access.

Why a subclass and not ``timm.create_model``: (1) we load weights ourselves (embedded / file / hub,
see :mod:`cvgl.models.weights`), (2) the position embedding is resized like Meta/Hugging Face DINOv2
(bicubic, no antialias, to the exact token grid) so features match the reference implementation
bit-for-bit at 224 px, where timm's default antialiased resize would not, and (3) hierarchical
pooling needs the tokens of intermediate blocks, and stops running blocks after the deepest one
it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from cvgl.errors import WeightsError

PATCH = 14

# Architecture hyper-parameters of the DINOv2 family (Oquab et al. 2023), keyed like Meta's hub.
_SIZES: dict[str, dict] = {
    "s": dict(embed_dim=384, depth=12, num_heads=6),
    "b": dict(embed_dim=768, depth=12, num_heads=12),
    "l": dict(embed_dim=1024, depth=24, num_heads=16),
    "g": dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU),
}


def arch_kwargs(arch: str) -> dict:
    """timm constructor arguments for ``dinov2_vit{s,b,l,g}14[_reg4]`` (and ``tiny`` for tests)."""
    if arch == "dinov2_tiny_test":  # a 2-block, 32-wide ViT/14 with random weights, for fast tests
        return dict(patch_size=PATCH, embed_dim=32, depth=2, num_heads=2, init_values=1e-5, img_size=56)
    if not (arch.startswith("dinov2_vit") and arch[10:11] in _SIZES and arch[11:13] == "14"):
        raise WeightsError(f"unknown architecture '{arch}'; expected dinov2_vit{{s,b,l,g}}14[_reg4]")
    kwargs = dict(patch_size=PATCH, init_values=1e-5, img_size=518, **_SIZES[arch[10]])
    if arch.endswith("_reg4"):
        kwargs.update(reg_tokens=4, no_embed_class=True)
    return kwargs


@dataclass
class LayerTokens:
    """Tokens of one block: ``cls`` ``[B, C]`` and ``patches`` as a map ``[B, C, h, w]``."""

    cls: torch.Tensor
    patches: torch.Tensor


class DinoV2(VisionTransformer):
    """A DINOv2 ViT that accepts any H, W divisible by 14 and exposes intermediate tokens."""

    def __init__(self, **kwargs) -> None:
        super().__init__(num_classes=0, dynamic_img_size=True, **kwargs)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Add position embeddings resized as DINOv2 does (bicubic, no antialias, exact grid)."""
        batch, h, w, dim = x.shape
        gh, gw = self.patch_embed.grid_size
        pos = self.pos_embed
        prefix_pos = None
        if not self.no_embed_class:
            prefix_pos, pos = pos[:, : self.num_prefix_tokens], pos[:, self.num_prefix_tokens :]
        if (h, w) != (gh, gw):
            grid = pos.reshape(1, gh, gw, dim).permute(0, 3, 1, 2)
            grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=False)
            pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(x.dtype)
        x = x.reshape(batch, h * w, dim)
        prefix = [self.cls_token.expand(batch, -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(batch, -1, -1))
        if self.no_embed_class:
            return torch.cat(prefix + [x + pos], dim=1)
        prefix[0] = prefix[0] + prefix_pos[:, :1]
        return torch.cat(prefix + [x + pos], dim=1)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def resolve_layer(self, layer: int) -> int:
        """1-based block number; negative counts from the end (-1 = last block)."""
        resolved = layer if layer > 0 else self.depth + 1 + layer
        if not 1 <= resolved <= self.depth:
            raise ValueError(f"layer {layer} out of range for a {self.depth}-block backbone")
        return resolved

    def forward_layers(self, images: torch.Tensor, layers: list[int], norm: bool = True) -> dict[int, LayerTokens]:
        """Tokens after each requested block (1-based), optionally through the final LayerNorm.

        Blocks after the deepest requested one are not run, so pooling layer 8 of 12 costs 2/3.
        """
        if images.shape[-1] % PATCH or images.shape[-2] % PATCH:
            raise ValueError(f"input {tuple(images.shape[-2:])} is not a multiple of {PATCH}")
        wanted = sorted({self.resolve_layer(layer) for layer in layers})
        gh, gw = images.shape[-2] // PATCH, images.shape[-1] // PATCH
        x = self.patch_embed(images)
        x = self._pos_embed(x)
        x = self.norm_pre(x)
        out: dict[int, LayerTokens] = {}
        for index, block in enumerate(self.blocks[: wanted[-1]], start=1):
            x = block(x)
            if index in wanted:
                tokens = self.norm(x) if norm else x
                patches = tokens[:, self.num_prefix_tokens :]
                out[index] = LayerTokens(
                    cls=tokens[:, 0],
                    patches=patches.transpose(1, 2).reshape(x.shape[0], -1, gh, gw),
                )
        return out

    def forward_all_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The final normalised token sequence ``[B, 1 + registers + N, C]`` (for verification)."""
        return self.forward_features(images)


def build_backbone(arch: str, state_dict: dict[str, torch.Tensor] | None = None) -> DinoV2:
    """Construct ``arch`` and load a timm-layout state dict (random init when None).

    With a state dict the model is built on the ``meta`` device (shapes only: timm's random
    initialisation of every weight, seconds for a ViT-S, is skipped) and the checkpoint's tensors
    are assigned as its parameters, as float32; any parameter the checkpoint does not provide is
    refused, so no weight can stay uninitialised.
    """
    if state_dict is None:
        return DinoV2(**arch_kwargs(arch)).eval()
    # Own, contiguous float32 copies: the parameters must not alias the caller's tensors, and
    # must have the memory layout ``load_state_dict``'s copy gave them (same kernels, same bits).
    state = {k: (v.to(torch.float32) if v.is_floating_point() else v).contiguous().clone()
             for k, v in state_dict.items()}
    kwargs = arch_kwargs(arch)
    with torch.device("meta"):
        model = DinoV2(**kwargs)
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        # Keep the checkpoint's native grid: rebuild with its size instead of resampling.
        n_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        side = int(round((state["pos_embed"].shape[1] - n_prefix) ** 0.5))
        with torch.device("meta"):
            model = DinoV2(**{**kwargs, "img_size": side * PATCH})
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise WeightsError(
            f"weights do not fit {arch}: missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}"
        )
    empty = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if empty:
        raise WeightsError(f"weights do not fit {arch}: no values for {empty[:4]}")
    return model.eval()


__all__ = ["DinoV2", "LayerTokens", "build_backbone", "arch_kwargs", "PATCH"]
