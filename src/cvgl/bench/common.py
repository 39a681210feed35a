"""Shared pieces of the benchmarks: many descriptors from one backbone pass, and baselines."""

from __future__ import annotations

import platform
import time

import numpy as np
import torch
from PIL import Image

from cvgl.models.backbone import DinoV2, build_backbone
from cvgl.models.encoder import PRESETS, Encoder
from cvgl.models.heads import HeadConfig, PoolingHead, PoolSpec
from cvgl.weights import load_weights

PRETRAINED_HEADS: dict[str, HeadConfig] = {
    "cls (last block)": PRESETS["cls"].head,
    "gem (last block)": PRESETS["gem"].head,
    "swrmac (last block)": PRESETS["swrmac"].head,
    "vfmloc-ref": PRESETS["vfmloc-ref"].head,
    "gem-l8": PRESETS["gem-l8"].head,
    "gem-l8 signed": PRESETS["gem-l8-signed"].head,
    "gem-l8 abs": HeadConfig((PoolSpec(kind="gem", layer=8, signed="abs"),)),
    "gem-l8 disc": PRESETS["gem-l8-disc"].head,
    "gem-l8 no final norm": HeadConfig((PoolSpec(kind="gem", layer=8),), final_norm=False),
    "hier l6+l8+l10": PRESETS["hier-l6-l8-l10"].head,
}
RANDOM_HEADS: dict[str, HeadConfig] = {
    "random-init ViT-S cls": PRESETS["cls"].head,
    "random-init ViT-S gem-l8": PRESETS["gem-l8"].head,
}


class SharedTokens:
    """Run one backbone once per batch with every needed block; pool with many heads.

    Comparing descriptors this way costs one backbone pass instead of one per descriptor, and
    guarantees they all see exactly the same pixels.
    """

    def __init__(self, backbone: DinoV2, heads: dict[str, HeadConfig], size: tuple[int, int] = (224, 224)) -> None:
        self.backbone = backbone
        self.encoders = {name: Encoder(backbone, PoolingHead(h), size) for name, h in heads.items()}
        self.layers = sorted({backbone.resolve_layer(p.layer) for h in heads.values() for p in h.pools})

    @torch.inference_mode()
    def encode(self, images: list[np.ndarray], batch: int = 16) -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {name: [] for name in self.encoders}
        first = next(iter(self.encoders.values()))
        for start in range(0, len(images), batch):
            x = torch.stack([first.to_tensor(im) for im in images[start : start + batch]])
            x = (x - first.mean) / first.std
            for norm in (True, False):
                names = [n for n, e in self.encoders.items() if e.head.config.final_norm == norm]
                if names:
                    tokens = self.backbone.forward_layers(x, self.layers, norm=norm)
                    for name in names:
                        head = self.encoders[name].head
                        mapped = {spec: tokens[self.backbone.resolve_layer(spec)] for spec in head.layers}
                        out[name].append(head(mapped).numpy())
        return {name: np.concatenate(v) for name, v in out.items()}


def raw_pixels(images: list[np.ndarray]) -> np.ndarray:
    """The no-learning baseline: 32x32 grey thumbnails, zero-mean, unit-norm."""
    out = []
    for im in images:
        g = np.asarray(Image.fromarray(np.asarray(im)).convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float32)
        g = g.ravel() - g.mean()
        out.append(g / max(float(np.linalg.norm(g)), 1e-6))
    return np.stack(out)


class Methods:
    """Every zero-shot descriptor of a comparison table, computed from the same images."""

    def __init__(
        self,
        seed: int,
        heads: dict[str, HeadConfig] | None = None,
        random_heads: dict[str, HeadConfig] | None = None,
        size: tuple[int, int] = (224, 224),
    ) -> None:
        weights = load_weights("embedded")
        self.pretrained = SharedTokens(build_backbone(weights.arch, weights.state_dict), heads or PRETRAINED_HEADS, size)
        torch.manual_seed(seed)
        random_heads = RANDOM_HEADS if random_heads is None else random_heads
        self.random = SharedTokens(build_backbone("dinov2_vits14"), random_heads, size) if random_heads else None

    def encode(self, images: list[np.ndarray], with_random: bool = True) -> dict[str, np.ndarray]:
        out = {"raw pixels": raw_pixels(images)}
        if self.random is not None and with_random:
            out.update(self.random.encode(images))
        out.update(self.pretrained.encode(images))
        return out


def top_k_per_query(query: np.ndarray, reference: np.ndarray, owner: np.ndarray, n_queries: int, k: int = 10) -> np.ndarray:
    """Top-k reference rows per query, where a query's score for a row is its best hypothesis.

    ``owner[i]`` is the query that hypothesis ``i`` belongs to. Ties keep reference order.
    """
    scores = query @ reference.T
    per_query = np.full((n_queries, len(reference)), -np.inf, dtype=np.float32)
    np.maximum.at(per_query, owner, scores)
    return np.argsort(-per_query, axis=1, kind="stable")[:, :k]


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}; {torch.get_num_threads()} torch threads; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}"
