"""DINOv2 backbone: a plain ViT/14 in timm's parameter layout, any input size, per-layer tokens.

Why our own module and not timm's ``VisionTransformer``: (1) importing timm imports torchvision
(``timm.layers`` needs ``torchvision.ops``), 1.5-4 s on every ``cvgl`` start for a model that uses
none of it; (2) we load weights ourselves (embedded / file / hub, see :mod:`cvgl.models.weights`),
so timm's random initialisation of weights about to be overwritten is skipped too; (3) the
position embedding is resized like Meta/Hugging Face DINOv2 (bicubic, no antialias, to the exact
token grid) so features match the reference implementation bit-for-bit at 224 px, where timm's
default antialiased resize would not; and (4) hierarchical pooling needs the tokens of
intermediate blocks, and stops running blocks after the deepest one it needs.

The module names and parameter names are timm's (``blocks.0.attn.qkv.weight``, ``ls1.gamma``, ...)
so timm-layout checkpoints load as they are; ``tests/test_backbone.py`` checks the forward pass
against timm's ``VisionTransformer`` (the reference) on the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cvgl.errors import WeightsError

PATCH = 14

# Architecture hyper-parameters of the DINOv2 family (Oquab et al. 2023), keyed like Meta's hub.
_SIZES: dict[str, dict] = {
    "s": dict(embed_dim=384, depth=12, num_heads=6),
    "b": dict(embed_dim=768, depth=12, num_heads=12),
    "l": dict(embed_dim=1024, depth=24, num_heads=16),
    "g": dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2, swiglu=True),
}


def arch_kwargs(arch: str) -> dict:
    """:class:`DinoV2` arguments for ``dinov2_vit{s,b,l,g}14[_reg4]`` (and ``tiny`` for tests)."""
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


class PatchEmbed(nn.Module):
    """Non-overlapping 14 px patches -> ``[B, h, w, C]`` (timm's ``PatchEmbed`` with NHWC output)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)  # the native position grid
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).permute(0, 2, 3, 1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(*qkv.unbind(0))
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """GELU MLP, or for ViT-g the packed SwiGLU (``fc1`` holds gate | value; SiLU on the first half)."""

    def __init__(self, dim: int, hidden: int, swiglu: bool = False) -> None:
        super().__init__()
        self.swiglu = swiglu
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.SiLU() if swiglu else nn.GELU()
        self.fc2 = nn.Linear(hidden // 2 if swiglu else hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.swiglu:
            gate, value = x.chunk(2, dim=-1)
            return self.fc2(self.act(gate) * value)
        return self.fc2(self.act(x))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with layer scale (DINOv2's)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, init_values: float, swiglu: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), swiglu)
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2(nn.Module):
    """A DINOv2 ViT that accepts any H, W divisible by 14 and exposes intermediate tokens."""

    def __init__(self, patch_size: int = PATCH, embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, init_values: float = 1e-5, img_size: int = 518, reg_tokens: int = 0,
                 no_embed_class: bool = False, swiglu: bool = False, in_chans: int = 3) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.no_embed_class = no_embed_class
        self.num_prefix_tokens = 1 + reg_tokens
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        gh, gw = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, gh * gw + (0 if no_embed_class else self.num_prefix_tokens), embed_dim))
        self.norm_pre = nn.Identity()
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, init_values, swiglu) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        if self.cls_token.device.type != "meta":
            self._init_random()

    @torch.no_grad()
    def _init_random(self) -> None:
        """Random weights (tests, ``random:<arch>``), as ViT training starts: truncated normal
        0.02 for linear layers and positions, 1e-6 for the class and register tokens, zero
        biases; a checkpoint replaces every one of them (see :func:`build_backbone`)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)

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

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Every block, then the final norm: ``[B, 1 + registers + N, C]``."""
        return self.norm(self.blocks(self.norm_pre(self._pos_embed(self.patch_embed(images)))))

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

    With a state dict the model is built on the ``meta`` device (shapes only: no random
    initialisation of weights about to be replaced) and the checkpoint's tensors
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
