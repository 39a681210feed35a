"""Encoder = backbone + head: images in, L2-normalised float32 descriptors out.

Build encoders with :func:`cvgl.models.factory.create_encoder` (the one way: zero-shot preset,
local/hub weights, a trained export, random test models). An encoder carries its
:class:`~cvgl.models.weights.PretrainedCfg` (weights, input size, normalisation) and its
:class:`~cvgl.models.identity.EncoderIdentity`, which every index records and checks.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from PIL import Image
from torch import nn

from cvgl.data.images import image_to_tensor
from cvgl.models.backbone import PATCH, DinoV2, LayerTokens
from cvgl.models.identity import EncoderIdentity
from cvgl.models.weights import PretrainedCfg


class Encoder(nn.Module):
    """Images in, L2-normalised float32 descriptors out.

    ``head`` is any module with ``layers`` (the blocks it reads), ``final_norm`` (whether those
    tokens pass the backbone's last LayerNorm) and ``forward({layer: LayerTokens}) -> [B, D]``:
    a zero-shot :class:`~cvgl.models.heads.PoolingHead` or a trained head
    (:class:`~cvgl.models.gengeo.ViewHead`).
    """

    def __init__(self, backbone: DinoV2, head: nn.Module, cfg: PretrainedCfg, identity: EncoderIdentity | None = None) -> None:
        super().__init__()
        size = tuple(cfg.input_size)
        if size[0] % PATCH or size[1] % PATCH:
            raise ValueError(f"input size {size} must be multiples of {PATCH}")
        self.backbone = backbone
        self.head = head
        self.cfg = cfg
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)
        self._layers = {layer: backbone.resolve_layer(layer) for layer in head.layers}
        self.identity = identity

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.cfg.input_size)

    @property
    def dim(self) -> int:
        return int(self.forward(torch.zeros(1, 3, *self.input_size)).shape[-1])

    def tokens(self, images: torch.Tensor, layers: Iterable[int] | None = None, norm: bool | None = None) -> dict[int, LayerTokens]:
        """Normalised ``images`` through the backbone: ``{layer spec: tokens}``.

        Default: the head's layers and final-norm choice. Callers that pool one pass with many
        heads (the benchmarks) ask for the union of their layers.
        """
        specs = list(self._layers) if layers is None else list(layers)
        norm = self.head.final_norm if norm is None else norm
        # .to(): an encoder that shares another module's parameters (GeoModel's views) is not
        # moved with it; the constants follow the images instead.
        x = (images - self.mean.to(images.device)) / self.std.to(images.device)
        resolved = {spec: self.backbone.resolve_layer(spec) for spec in specs}
        tokens = self.backbone.forward_layers(x, sorted(set(resolved.values())), norm=norm)
        return {spec: tokens[layer] for spec, layer in resolved.items()}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: float ``[B, 3, H, W]`` in [0, 1] (already resized)."""
        return self.head(self.tokens(images))

    def to_tensor(self, image: np.ndarray | Image.Image) -> torch.Tensor:
        """HxWx3 uint8 (or PIL) -> ``[3, H, W]`` float in [0, 1] at the encoder's input size."""
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        return image_to_tensor(pil.convert("RGB"), self.input_size)

    @torch.inference_mode()
    def encode(self, images: Iterable[np.ndarray | Image.Image], batch_size: int = 16) -> np.ndarray:
        """Encode an iterable of images in batches -> ``[N, D]`` float32."""
        out: list[np.ndarray] = []
        batch: list[torch.Tensor] = []
        for image in images:
            batch.append(self.to_tensor(image))
            if len(batch) == batch_size:
                out.append(self.forward(torch.stack(batch)).float().numpy())
                batch = []
        if batch:
            out.append(self.forward(torch.stack(batch)).float().numpy())
        if not out:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)


__all__ = ["Encoder"]
