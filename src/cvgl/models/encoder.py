"""Encoder = backbone + head: images in, L2-normalised float32 descriptors out.

Build encoders with :func:`cvgl.models.factory.create_encoder` (the one way: zero-shot preset,
local/hub weights, a trained export, random test models). An encoder carries its
:class:`~cvgl.models.weights.PretrainedCfg` (weights, input size, normalisation) and its
:class:`~cvgl.models.identity.EncoderIdentity`, which every index records and checks.

How it computes is set on top (:mod:`cvgl.models.runtime`): ``precision`` (``fp32``, or ``bf16``
for the backbone only: normalisation and head stay float32) and ``runtime`` (eager ``torch``, or a
compiled runner such as OpenVINO). Both change speed, not what a descriptor is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from PIL import Image
from torch import nn

from cvgl.data.images import image_to_tensor
from cvgl.models.backbone import PATCH, DinoV2, LayerTokens
from cvgl.models.identity import EncoderIdentity
from cvgl.models.weights import PretrainedCfg

#: The backbone's dtype per precision name (see :mod:`cvgl.models.runtime`).
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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
        self.precision = "fp32"
        self.runtime = "torch"
        self._runner: Callable[[torch.Tensor], torch.Tensor] | None = None

    def set_precision(self, precision: str) -> Encoder:
        """Cast the backbone to ``precision`` (``fp32`` | ``bf16``); the head and the normalisation
        constants stay float32, and descriptors come out float32 either way."""
        self.backbone.to(PRECISION_DTYPES[precision])
        self.precision = precision
        return self

    def set_runner(self, runner: Callable[[torch.Tensor], torch.Tensor] | None, runtime: str = "torch") -> Encoder:
        """Let ``runner`` (images -> descriptors, e.g. an OpenVINO compiled model of this very
        encoder, exported at :attr:`input_size`) compute :meth:`forward` for batches at the input
        size; other sizes, and None, run eager torch."""
        self._runner = runner
        self.runtime = runtime if runner is not None else "torch"
        return self

    def describe(self) -> str:
        """How descriptors are computed, for start-up lines and manifests: ``bf16 on torch``."""
        return f"{self.precision} on {self.runtime}"

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
        dtype = self.backbone.cls_token.dtype  # bf16 runs the backbone only; the head reads float32
        tokens = self.backbone.forward_layers(x.to(dtype), sorted(set(resolved.values())), norm=norm)
        if dtype != torch.float32:
            tokens = {layer: LayerTokens(t.cls.float(), t.patches.float()) for layer, t in tokens.items()}
        return {spec: tokens[layer] for spec, layer in resolved.items()}

    def torch_forward(self, images: torch.Tensor) -> torch.Tensor:
        """Eager torch: normalisation, backbone (at the encoder's precision), head."""
        return self.head(self.tokens(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: float ``[B, 3, H, W]`` in [0, 1] (already resized)."""
        if self._runner is not None and tuple(images.shape[-2:]) == self.input_size:
            return self._runner(images)
        return self.torch_forward(images)

    def to_tensor(self, image: np.ndarray | Image.Image) -> torch.Tensor:
        """HxWx3 uint8 (or PIL) -> ``[3, H, W]`` float in [0, 1] at the encoder's input size."""
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        return image_to_tensor(pil.convert("RGB"), self.input_size)

    def pixels(self, image: np.ndarray | Image.Image) -> np.ndarray:
        """HxWx3 uint8 at the encoder's input size: the same pixels as :meth:`to_tensor`
        (RGB, bicubic resize only when the size differs), without the per-image float copy."""
        height, width = self.input_size
        if not isinstance(image, Image.Image):
            array = np.asarray(image)
            if array.dtype == np.uint8 and array.shape == (height, width, 3):
                return array
            image = Image.fromarray(array)
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.BICUBIC)
        return np.asarray(image)

    def batch_tensor(self, images: list[np.ndarray | Image.Image]) -> torch.Tensor:
        """A contiguous float ``[B, 3, H, W]`` batch in [0, 1], equal to stacking :meth:`to_tensor`:
        the uint8 pixels go into one array, then one permute + one cast (not B permuted views)."""
        height, width = self.input_size
        array = np.empty((len(images), height, width, 3), dtype=np.uint8)
        for i, image in enumerate(images):
            array[i] = self.pixels(image)
        batch = torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
        return batch.to(self.backbone.cls_token.device, torch.float32).div_(255.0)

    @torch.inference_mode()
    def encode(self, images: Iterable[np.ndarray | Image.Image], batch_size: int = 16) -> np.ndarray:
        """Encode an iterable of images in batches -> ``[N, D]`` float32."""
        out: list[np.ndarray] = []
        batch: list[np.ndarray | Image.Image] = []
        for image in images:
            batch.append(image)
            if len(batch) == batch_size:
                out.append(self.forward(self.batch_tensor(batch)).float().cpu().numpy())
                batch = []
        if batch:
            out.append(self.forward(self.batch_tensor(batch)).float().cpu().numpy())
        if not out:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)


__all__ = ["Encoder", "PRECISION_DTYPES"]
