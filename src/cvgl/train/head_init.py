"""Data-dependent head initialisation before the first step of a new run.

NetVLAD sums residuals to its centroids, so it starts from k-means centroids of training patch
tokens (as the NetVLAD paper does) rather than from random ones. SALAD and CLS heads need no data
to start. A resumed run skips this: its centroids are in the checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch

from cvgl.data.datasets.common import CrossViewSplit, load_resized
from cvgl.models.gengeo import GeoModel
from cvgl.models.netvlad import NetVLAD
from cvgl.models.view_heads import eval_mode
from cvgl.train.config import TrainConfig


@torch.no_grad()
def init_netvlad_heads(model: GeoModel, split: CrossViewSplit, config: TrainConfig, images: int = 64) -> None:
    """Cluster the backbone's patch tokens of ``images`` training images (seeded) into each NetVLAD head."""
    heads = [h for h in (model.heads.query, model.heads.reference) if isinstance(h, NetVLAD)]
    if not heads:
        return
    pairs = split.pairs()
    pick = np.random.default_rng(config.seed).permutation(len(pairs))[:images]
    # Both views' tokens when they share an input size (a shared head clusters both), else tiles only.
    size = config.model.reference_size
    paths = [split.references[pairs[i][1]].path for i in pick]
    if config.model.query_size == size:
        half = len(pick) // 2
        paths = [split.queries[pairs[i][0]].path for i in pick[:half]] + paths[half:]
    batch = torch.stack([load_resized(path, size) for path in paths])
    with eval_mode(model):
        patches = model.tokens(batch).patches  # [B, C, h, w]
    features = patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1])
    for head in heads:
        head.init_from_features(features, seed=config.seed)
