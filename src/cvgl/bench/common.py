"""Shared pieces of the benchmarks: many descriptors from one backbone pass, and baselines."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cvgl.io import write_text_atomic
from cvgl.models.backbone import DinoV2
from cvgl.models.encoder import Encoder
from cvgl.models.factory import load_backbone
from cvgl.models.heads import PoolingHead
from cvgl.models.presets import PRESETS, HeadConfig, PoolSpec
from cvgl.models.runtime import cpu_name
from cvgl.models.weights import PretrainedCfg, WeightsSource

PRETRAINED_HEADS: dict[str, HeadConfig] = {
    "cls (last block)": PRESETS["cls"].head,
    "gem (last block)": PRESETS["gem"].head,
    "swrmac (last block)": PRESETS["swrmac"].head,
    "vfmloc-ref": PRESETS["vfmloc-ref"].head,
    "gem-l8": PRESETS["gem-l8"].head,
    "gem-l8 signed": PRESETS["gem-l8-signed"].head,
    "gem-l8 abs": HeadConfig((PoolSpec(kind="gem", layer=8, signed="abs"),)),
    "gem-l8 disc": PRESETS["gem-l8-disc"].head,
    "gem-l8-raw (no final norm)": PRESETS["gem-l8-raw"].head,
    "hier l6+l8+l10": PRESETS["hier-l6-l8-l10"].head,
}
RANDOM_HEADS: dict[str, HeadConfig] = {
    "random-init ViT-S cls": PRESETS["cls"].head,
    "random-init ViT-S gem-l8": PRESETS["gem-l8"].head,
}


class SharedTokens:
    """Run one backbone once per batch with every needed block; pool with many heads.

    Comparing descriptors this way costs one backbone pass instead of one per descriptor, and
    guarantees they all see exactly the same pixels. Images are resized to ``size`` unless
    :meth:`encode` is given a per-image input size; descriptors equal ``Encoder.encode`` at that
    size because each head's encoder computes them, from tokens its own :meth:`Encoder.tokens`
    produced for the union of the heads' blocks.
    """

    def __init__(self, backbone: DinoV2, heads: dict[str, HeadConfig], size: tuple[int, int] = (224, 224),
                 weights: str = "embedded") -> None:
        self.backbone = backbone
        self.size = tuple(size)
        self.weights = WeightsSource.parse(weights)
        self.encoders = {name: self._encoder(PoolingHead(h), self.size) for name, h in heads.items()}
        self._resizers: dict[tuple[int, int], Encoder] = {}

    def _encoder(self, head: PoolingHead, size: tuple[int, int]) -> Encoder:
        return Encoder(self.backbone, head, PretrainedCfg(self.weights, tuple(size)))

    def _resizer(self, size: tuple[int, int]) -> Encoder:
        """An encoder at ``size`` whose ``to_tensor`` and ``tokens`` prepare that size's batches."""
        first = next(iter(self.encoders.values()))
        if size == self.size:
            return first
        if size not in self._resizers:
            self._resizers[size] = self._encoder(first.head, size)  # checks multiples of 14
        return self._resizers[size]

    @torch.inference_mode()
    def encode(
        self,
        images: Sequence[np.ndarray],
        batch: int = 16,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> dict[str, np.ndarray]:
        """``images``: HxWx3 uint8 -> ``{head: [N, D] float32}``, rows in input order.

        ``sizes``: optional (height, width) input size per image (multiples of 14). Images are
        grouped by size, each group runs through the backbone in batches of ``batch``, and the
        descriptors are put back in input order. Default: every image at ``self.size``.
        """
        targets = [self.size] * len(images) if sizes is None else [tuple(s) for s in sizes]
        if len(targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(targets)} input sizes")
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, size in enumerate(targets):
            by_size[size].append(i)
        out: dict[str, list] = {name: [None] * len(images) for name in self.encoders}
        for size, indices in by_size.items():
            prep = self._resizer(size)
            for start in range(0, len(indices), batch):
                chunk = indices[start : start + batch]
                x = torch.stack([prep.to_tensor(images[i]) for i in chunk])
                for norm in (True, False):
                    names = [n for n, e in self.encoders.items() if e.head.final_norm == norm]
                    if not names:
                        continue
                    # one pass for the union of the blocks: the backbone stops after the deepest one
                    layers = sorted({spec for n in names for spec in self.encoders[n].head.layers})
                    tokens = prep.tokens(x, layers, norm=norm)
                    for name in names:
                        desc = self.encoders[name].head(tokens).float().numpy()
                        for row, i in enumerate(chunk):
                            out[name][i] = desc[row]
        return {name: np.stack(rows).astype(np.float32) for name, rows in out.items()}


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
        self.pretrained = SharedTokens(load_backbone("embedded")[0], heads or PRETRAINED_HEADS, size)
        torch.manual_seed(seed)
        random_heads = RANDOM_HEADS if random_heads is None else random_heads
        self.random = SharedTokens(load_backbone("random:dinov2_vits14")[0], random_heads, size, "random:dinov2_vits14") if random_heads else None

    def encode(self, images: list[np.ndarray], with_random: bool = True) -> dict[str, np.ndarray]:
        out = {"raw pixels": raw_pixels(images)}
        if self.random is not None and with_random:
            out.update(self.random.encode(images))
        out.update(self.pretrained.encode(images))
        return out


def machine_line() -> str:
    return f"{cpu_name()}; {torch.get_num_threads()} torch threads; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}"


def emit_section(text: str, out: Path | None) -> int:
    """A benchmark's ending: print its Markdown and, with ``--out``, write it atomically."""
    print(text)
    if out is not None:
        write_text_atomic(out, text)
    return 0


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A Markdown table as lines: header, rule, one line per row (cells through ``str``)."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def log(message: str) -> None:
    """Progress of a long benchmark: a timestamped line on stderr (stdout carries the section)."""
    import sys

    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
