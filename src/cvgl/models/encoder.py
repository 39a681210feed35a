"""Encoder = backbone + head, and the one factory that builds encoders by preset name.

An encoder's *identity* (preset, architecture, weights hash, input size, normalisation, head
recipe) is written into every index manifest; opening an index with an encoder whose identity
differs is an error (:class:`cvgl.errors.IndexMismatchError`), never a silent mismatch.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from cvgl.data.images import image_to_tensor
from cvgl.errors import WeightsError
from cvgl.models.backbone import PATCH, DinoV2, build_backbone
from cvgl.models.heads import PoolingHead
from cvgl.models.presets import DEFAULT_PRESET, PRESETS, EncoderPreset, HeadConfig, PoolSpec, get_preset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Encoder(nn.Module):
    """Images in, L2-normalised float32 descriptors out.

    ``head`` is any module with ``layers`` (the blocks it reads), ``final_norm`` (whether those
    tokens pass the backbone's last LayerNorm) and ``forward({layer: LayerTokens}) -> [B, D]``:
    a zero-shot :class:`PoolingHead` or a trained head (:class:`cvgl.train.model.ViewHead`).
    """

    def __init__(
        self,
        backbone: DinoV2,
        head: nn.Module,
        input_size: tuple[int, int] = (224, 224),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        identity: dict | None = None,
    ) -> None:
        super().__init__()
        if input_size[0] % PATCH or input_size[1] % PATCH:
            raise ValueError(f"input size {input_size} must be multiples of {PATCH}")
        self.backbone = backbone
        self.head = head
        self.input_size = tuple(input_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._layers = {layer: backbone.resolve_layer(layer) for layer in head.layers}
        self.identity = identity or {}

    @property
    def dim(self) -> int:
        return int(self.forward(torch.zeros(1, 3, *self.input_size)).shape[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: float ``[B, 3, H, W]`` in [0, 1] (already resized)."""
        x = (images - self.mean) / self.std
        tokens = self.backbone.forward_layers(x, list(self._layers.values()), norm=self.head.final_norm)
        return self.head({spec: tokens[resolved] for spec, resolved in self._layers.items()})

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


def head_to_dict(head: HeadConfig) -> dict:
    return dataclasses.asdict(head)


def load_backbone(weights: str = "embedded", seed: int | None = None) -> tuple[DinoV2, str, str]:
    """(backbone, architecture, weights hash) from ``"embedded"``, a file, ``"hub:<arch>"`` or
    ``"random:<arch>"``.

    Random initialisation draws from ``torch.manual_seed(seed)`` without touching the global
    generator when ``seed`` is given, and from the global generator when it is None.
    """
    from cvgl.weights import load_weights

    if weights.startswith("random:"):
        arch = weights.split(":", 1)[1]
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            backbone = build_backbone(arch)
        return backbone, arch, "random-" + _tensor_hash(backbone)
    loaded = load_weights(weights)
    return build_backbone(loaded.arch, loaded.state_dict), loaded.arch, loaded.sha256


def create_encoder(
    preset: str | EncoderPreset = DEFAULT_PRESET,
    weights: str = "embedded",
    input_size: tuple[int, int] | None = None,
    view: str = "reference",
) -> Encoder:
    """The one way to build an encoder: a preset (or preset object) plus a weights source.

    ``weights`` is ``"embedded"``, a file path, ``"hub:<arch>"`` or ``"random:<arch>"`` (random
    initialisation, for tests and the random-init baseline; seeded by ``torch.manual_seed``).
    A model trained by ``cvgl train`` (its exported ``.safetensors``) carries its own head and
    input sizes: ``preset`` and ``input_size`` are then ignored, and ``view`` picks the query or
    reference branch (they differ only with a non-shared head or different input sizes).
    """
    from cvgl.weights import is_trained_export

    if is_trained_export(weights):
        from cvgl.train.model import trained_encoder

        return trained_encoder(weights, view)
    spec = get_preset(preset) if isinstance(preset, str) else preset
    size = tuple(input_size or spec.input_size)
    backbone, arch, weights_hash = load_backbone(weights)
    identity = {
        "preset": spec.name,
        "arch": arch,
        "weights_sha256": weights_hash,
        "input_size": list(size),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "head": json.loads(json.dumps(head_to_dict(spec.head))),
    }
    try:
        return Encoder(backbone, PoolingHead(spec.head), size, identity=identity)
    except ValueError as exc:
        raise WeightsError(f"encoder '{spec.name}' does not fit {arch}: {exc}") from None


def _tensor_hash(module: nn.Module) -> str:
    from cvgl.weights import state_dict_sha256

    return state_dict_sha256(module.state_dict())[:16]


__all__ = [
    "Encoder",
    "EncoderPreset",
    "PRESETS",
    "DEFAULT_PRESET",
    "create_encoder",
    "get_preset",
    "HeadConfig",
    "PoolSpec",
]
