"""The one way to build an encoder: :func:`create_encoder` (timm's ``create_model``).

Whatever the weights — the embedded DINOv2, a local or hub checkpoint, a model trained by
``cvgl train``, or random weights for tests — the result is an :class:`Encoder` with its
:class:`PretrainedCfg` and :class:`EncoderIdentity`. :class:`EncoderRecipe` is the same call
in picklable form, for processes that must build an identical encoder (Ray actors).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
from torch import nn

from cvgl.errors import WeightsError
from cvgl.models.backbone import DinoV2, build_backbone
from cvgl.models.encoder import Encoder
from cvgl.models.gengeo import encoder_from_model, load_trained
from cvgl.models.heads import PoolingHead
from cvgl.models.identity import EncoderIdentity
from cvgl.models.presets import DEFAULT_PRESET, EncoderPreset, HeadConfig, get_preset
from cvgl.models.runtime import check_request, configure
from cvgl.models.weights import (
    PretrainedCfg,
    WeightsSource,
    load_weights,
    state_dict_sha256,
)


def head_to_dict(head: HeadConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(head)))


def load_backbone(weights: str | WeightsSource = "embedded", seed: int | None = None) -> tuple[DinoV2, str, str]:
    """(backbone, architecture, weights hash) from an embedded, file, hub or random source.

    Random initialisation draws from ``torch.manual_seed(seed)`` without touching the global
    generator when ``seed`` is given, and from the global generator when it is None.
    """
    source = WeightsSource.parse(weights)
    if source.kind == "random":
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            backbone = build_backbone(source.value)
        return backbone, source.value, "random-" + _tensor_hash(backbone)
    if source.kind == "trained":
        raise WeightsError(f"{source}: a trained cvgl model, not a backbone checkpoint; use it as an encoder's --weights")
    loaded = load_weights(source)
    return build_backbone(loaded.arch, loaded.state_dict), loaded.arch, loaded.sha256


def create_encoder(
    preset: str | EncoderPreset = DEFAULT_PRESET,
    weights: str | WeightsSource = "embedded",
    input_size: tuple[int, int] | None = None,
    view: str = "reference",
    precision: str = "fp32",
    runtime: str = "torch",
    device: str = "cpu",
) -> Encoder:
    """An encoder from a zero-shot preset (or preset object) and a weights source.

    ``weights``: ``"embedded"``, a file path, ``"hub:<arch>"``, ``"random:<arch>"`` (random
    initialisation from the global generator, for tests and the random-init baseline) or a
    model trained by ``cvgl train`` (its exported ``.safetensors``). A trained model carries
    its own head and input sizes: ``preset`` and ``input_size`` are then ignored, and ``view``
    picks the query or reference branch (they differ only with a non-shared head or different
    input sizes).

    ``precision`` (``fp32 | bf16 | auto``) and ``runtime`` (``torch | openvino | auto``) set how
    it computes (:mod:`cvgl.models.runtime`); the defaults are the plain reference, the CLI asks
    for ``auto``. Neither is part of the identity: descriptors stay comparable across them.
    """
    check_request(precision, runtime, device)  # a missing runtime is one line before any weights load
    source = WeightsSource.parse(weights)
    if source.kind == "trained":
        model, digest, name = load_trained(source.value)
        encoder = encoder_from_model(model, view, digest, name, source.value).eval()
        return configure(encoder, precision, runtime, device)
    spec = get_preset(preset) if isinstance(preset, str) else preset
    cfg = PretrainedCfg(source, tuple(input_size or spec.input_size))
    backbone, arch, weights_hash = load_backbone(source)
    identity = EncoderIdentity(
        preset=spec.name,
        arch=arch,
        weights_sha256=weights_hash,
        input_size=cfg.input_size,
        mean=cfg.mean,
        std=cfg.std,
        head=head_to_dict(spec.head),
    )
    try:
        encoder = Encoder(backbone, PoolingHead(spec.head), cfg, identity)
    except ValueError as exc:
        raise WeightsError(f"encoder '{spec.name}' does not fit {arch}: {exc}") from None
    return configure(encoder, precision, runtime, device)


@dataclass(frozen=True)
class EncoderRecipe:
    """A :func:`create_encoder` call that another process can repeat to get the same encoder.

    Random weights (``random:<arch>``) are drawn from torch's global generator: the recipe
    captures the caller's generator state so every process draws the same weights.
    """

    preset: str
    weights: str = "embedded"
    input_size: tuple[int, int] | None = None
    view: str = "reference"
    rng_state: bytes | None = None
    precision: str = "fp32"
    runtime: str = "torch"

    @classmethod
    def capture(cls, preset: str, weights: str = "embedded", input_size: tuple[int, int] | None = None,
                view: str = "reference", precision: str = "fp32", runtime: str = "torch") -> EncoderRecipe:
        random = WeightsSource.parse(weights).kind == "random"
        state = torch.get_rng_state().numpy().tobytes() if random else None
        return cls(preset, str(weights), None if input_size is None else tuple(input_size), view, state, precision, runtime)

    def build(self) -> Encoder:
        settings = dict(precision=self.precision, runtime=self.runtime)
        if self.rng_state is None:
            return create_encoder(self.preset, self.weights, self.input_size, self.view, **settings)
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(torch.frombuffer(bytearray(self.rng_state), dtype=torch.uint8))
            return create_encoder(self.preset, self.weights, self.input_size, self.view, **settings)


def _tensor_hash(module: nn.Module) -> str:
    return state_dict_sha256(module.state_dict())[:16]


__all__ = ["create_encoder", "load_backbone", "EncoderRecipe", "Encoder", "EncoderIdentity", "PretrainedCfg", "WeightsSource"]
