"""GenGeo: a Siamese DINOv2 shared by both views + a (shared) aggregation head, and its export.

One :class:`GeoModel` call encodes a batch of query images and a batch of reference images, so
``DistributedDataParallel`` sees one forward per backward. A trained model is exported as one
``.safetensors`` file (backbone + heads, config in the metadata; :func:`export_trained`) that
``cvgl index`` / ``locate`` / ``serve`` take as ``--weights`` like any DINOv2 file:
:func:`encoder_from_model` turns it into an ordinary :class:`~cvgl.models.encoder.Encoder` for
one view. Building a model *for training* (which blocks train) is :mod:`cvgl.train.model`'s job.
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
from cvgl.models.encoder import Encoder
from cvgl.models.identity import EncoderIdentity
from cvgl.models.presets import ModelConfig
from cvgl.models.view_heads import HeadSpec, ViewHeads
from cvgl.models.weights import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TRAINED_EXPORT_FORMAT,
    PretrainedCfg,
    WeightsSource,
    state_dict_sha256,
)
from cvgl.typed import from_dict, plain_dict


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
        residual=config.residual,
    )


class GeoModel(nn.Module):
    """Backbone (last block, final LayerNorm) -> per-view head -> L2-normalised descriptors.

    The two views' forward passes are :class:`Encoder` s sharing this model's modules, so the
    image normalisation and the head interface exist once (in the encoder).
    """

    def __init__(self, backbone: DinoV2, heads: ViewHeads, arch: str, config: ModelConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.arch = arch
        self.config = config
        # Not registered as submodules: they share backbone and heads (no duplicate parameters).
        self._views = {
            view: Encoder(backbone, ViewHead(heads, view, config), PretrainedCfg(WeightsSource("trained"), size))
            for view, size in (("query", config.query_size), ("reference", config.reference_size))
        }

    def tokens(self, images: torch.Tensor) -> LayerTokens:
        """The tokens the head reads (block ``config.block``) of ``images`` (float ``[B, 3, H, W]`` in [0, 1])."""
        return self._views["reference"].tokens(images)[self.config.block]

    def encode(self, images: torch.Tensor, view: str) -> torch.Tensor:
        if view not in self._views:
            raise ValueError(f"unknown view '{view}'; expected query | reference")
        return self._views[view](images)

    def forward(self, query: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(query, "query"), self.encode(reference, "reference")


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

    The hash is :func:`cvgl.models.weights.state_dict_sha256`, as for every other weights
    source, so an index refuses any other model and accepts a copy of the same one.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
        config = from_dict(ModelConfig, json.loads(meta["model"]), f"{path} metadata")
        arch = meta["arch"]
        name = meta.get("name", "gengeo")
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"{path}: not a readable cvgl trained model ({type(exc).__name__}: {exc})") from None
    try:
        backbone = build_backbone(arch)
        heads = ViewHeads.build(head_spec(config), backbone.embed_dim)
        model = GeoModel(backbone, heads, arch, config)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise WeightsError(f"{path}: its metadata describes a model that cannot be built ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:120]})") from None
    # Shapes first: load_state_dict reports a wrong shape as a multi-line RuntimeError.
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
            raise WeightsError(f"{path}: tensor '{key}' has shape {list(tensor.shape)} but the model needs "
                               f"{list(expected[key].shape)}; the file is damaged or was edited")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    return model, state_dict_sha256(state), name


class ViewHead(nn.Module):
    """Adapts a trained per-view head to the :class:`Encoder` head interface.

    It reads one block (``config.block``, the last by default), through the final LayerNorm unless
    the head is residual (the zero-shot pooling it starts from reads raw tokens).
    """

    def __init__(self, heads: ViewHeads, view: str, config: ModelConfig) -> None:
        super().__init__()
        self.heads = heads
        self.view = view
        self.layers = [config.block]
        self.final_norm = not config.residual

    def forward(self, tokens: dict[int, LayerTokens]) -> torch.Tensor:
        return self.heads(tokens[self.layers[0]], self.view)


def encoder_from_model(model: GeoModel, view: str, weights_hash: str, name: str = "gengeo", source: str = "") -> Encoder:
    """An inference :class:`Encoder` for ``view`` ("query" or "reference") sharing ``model``'s modules.

    The identity is the same for both views (reference input size, whole-model config), so an
    index built with the reference view accepts the query view of the same file.
    """
    config = model.config
    size = config.query_size if view == "query" else config.reference_size
    identity = EncoderIdentity(
        preset=name,
        arch=model.arch,
        weights_sha256=weights_hash,
        input_size=tuple(config.reference_size),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        head={"trained": plain_dict(config)},
    )
    cfg = PretrainedCfg(WeightsSource("trained", source), tuple(size))
    return Encoder(model.backbone, ViewHead(model.heads, view, config), cfg, identity)
