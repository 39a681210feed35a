"""GenGeo: a Siamese DINOv2 shared by both views + a (shared) aggregation head, and its export.

One :class:`GeoModel` call encodes a batch of query images and a batch of reference images, so
``DistributedDataParallel`` sees one forward per backward. A trained model is exported as one
``.safetensors`` file (backbone + heads, config in the metadata) that ``cvgl index`` and
``cvgl locate`` take as ``--weights`` like any DINOv2 file: :func:`trained_encoder` turns it
into an ordinary :class:`cvgl.models.encoder.Encoder` for one view.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from torch import nn

from cvgl.errors import WeightsError
from cvgl.io import write_bytes_atomic
from cvgl.models.backbone import DinoV2, LayerTokens, build_backbone
from cvgl.models.encoder import IMAGENET_MEAN, IMAGENET_STD, Encoder, load_backbone
from cvgl.models.trainable import HeadSpec, ViewHeads, set_trainable
from cvgl.train.config import ModelConfig, model_config_from_dict, plain_dict
from cvgl.weights import TRAINED_EXPORT_FORMAT, state_dict_sha256


def head_spec(config: ModelConfig) -> HeadSpec:
    return HeadSpec(
        kind=config.head,
        num_clusters=config.num_clusters,
        cluster_dim=config.cluster_dim,
        token_dim=config.token_dim,
        dustbin=config.dustbin,
        out_dim=config.out_dim,
        shared=config.shared_head,
        dropout=config.dropout,
    )


class GeoModel(nn.Module):
    """Backbone (last block, final LayerNorm) -> per-view head -> L2-normalised descriptors."""

    def __init__(self, backbone: DinoV2, heads: ViewHeads, arch: str, config: ModelConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.arch = arch
        self.config = config
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def tokens(self, images: torch.Tensor) -> LayerTokens:
        """Last-block tokens of ``images`` (float ``[B, 3, H, W]`` in [0, 1])."""
        x = (images - self.mean) / self.std
        return self.backbone.forward_layers(x, [-1], norm=True)[self.backbone.depth]

    def encode(self, images: torch.Tensor, view: str) -> torch.Tensor:
        return self.heads(self.tokens(images), view)

    def forward(self, query: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(query, "query"), self.encode(reference, "reference")


def build_model(config: ModelConfig, seed: int = 0) -> tuple[GeoModel, str]:
    """(model, weights hash): backbone weights from ``config.weights``, head initialised from ``seed``."""
    backbone, arch, weights_hash = load_backbone(config.weights, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = ViewHeads.build(head_spec(config), backbone.embed_dim)
    set_trainable(backbone, config.finetune, config.last_n)
    return GeoModel(backbone, heads, arch, config), weights_hash


def export_trained(model: GeoModel, path: Path, name: str = "gengeo", extra: dict | None = None) -> Path:
    """Write the model (backbone + heads, no optimizer) as one safetensors file, atomically.

    ``name`` becomes the encoder's preset name in index manifests built with the file.
    """
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {
        "format": TRAINED_EXPORT_FORMAT,
        "name": name,
        "arch": model.arch,
        "model": json.dumps(plain_dict(model.config)),
        "extra": json.dumps(extra or {}),
    }
    return write_bytes_atomic(path, save_safetensors(state, metadata=meta))


def load_trained(path: str | Path) -> tuple[GeoModel, str, str]:
    """(model in eval mode, sha256 of its tensors, run name) from an export.

    The hash is :func:`cvgl.weights.state_dict_sha256`, as for every other weights source, so an
    index refuses any other model and accepts a copy of the same one.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
        config = model_config_from_dict(json.loads(meta["model"]), f"{path} metadata")
        arch = meta["arch"]
        name = meta.get("name", "gengeo")
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"{path}: not a readable cvgl trained model ({type(exc).__name__}: {exc})") from None
    backbone = build_backbone(arch)
    heads = ViewHeads.build(head_spec(config), backbone.embed_dim)
    model = GeoModel(backbone, heads, arch, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    return model, state_dict_sha256(state), name


class ViewHead(nn.Module):
    """Adapts a trained per-view head to the :class:`Encoder` head interface (last block only)."""

    layers = [-1]
    final_norm = True

    def __init__(self, heads: ViewHeads, view: str) -> None:
        super().__init__()
        self.heads = heads
        self.view = view

    def forward(self, tokens: dict[int, LayerTokens]) -> torch.Tensor:
        return self.heads(tokens[-1], self.view)


def encoder_from_model(model: GeoModel, view: str, weights_hash: str, name: str = "gengeo") -> Encoder:
    """An inference :class:`Encoder` for ``view`` ("query" or "reference") sharing ``model``'s modules.

    The identity is the same for both views (reference input size, whole-model config), so an
    index built with the reference view accepts the query view of the same file.
    """
    config = model.config
    size = config.query_size if view == "query" else config.reference_size
    identity = {
        "preset": name,
        "arch": model.arch,
        "weights_sha256": weights_hash,
        "input_size": list(config.reference_size),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "head": {"trained": plain_dict(config)},
    }
    return Encoder(model.backbone, ViewHead(model.heads, view), size, identity=identity)


def trained_encoder(path: str | Path, view: str = "reference") -> Encoder:
    model, digest, name = load_trained(path)
    return encoder_from_model(model, view, digest, name).eval()
