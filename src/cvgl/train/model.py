"""The GenGeo model as training builds it: pretrained backbone, fresh heads, chosen blocks trainable."""

from __future__ import annotations

import torch

from cvgl.models.factory import load_backbone
from cvgl.models.gengeo import GeoModel, head_spec
from cvgl.models.presets import ModelConfig
from cvgl.models.view_heads import ViewHeads
from cvgl.train.policy import set_trainable


def build_model(config: ModelConfig, seed: int = 0) -> tuple[GeoModel, str]:
    """(model, weights hash): backbone weights from ``config.weights``, head initialised from ``seed``."""
    backbone, arch, weights_hash = load_backbone(config.weights, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = ViewHeads.build(head_spec(config), backbone.embed_dim)
    set_trainable(backbone, config.finetune, config.last_n, config.block, final_norm=not config.residual)
    return GeoModel(backbone, heads, arch, config), weights_hash
