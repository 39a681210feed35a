"""Named zero-shot recipes, as plain data (no torch import: the CLI lists them instantly).

A :class:`PoolSpec` says which block to read and how to pool it; a :class:`HeadConfig` is a list of
pools concatenated; an :class:`EncoderPreset` adds the input size. :mod:`cvgl.models.heads`
applies them to tokens; :func:`cvgl.models.encoder.create_encoder` builds an encoder from a preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PoolSpec:
    """One component of a descriptor: which block, which pooling, its weight in the concat."""

    kind: str = "gem"  # cls | gem | swrmac
    layer: int = -1  # 1-based block number; negative counts from the end
    p: float = 3.0
    signed: str = "clamp"
    levels: tuple[int, ...] = (1, 2)
    level_power: float = 6.0
    weight: float = 1.0
    region: str = "full"  # full | disc (see disc_mask), for gem


@dataclass(frozen=True)
class HeadConfig:
    """A descriptor recipe: pools concatenated (each L2-normalised and weighted), then L2-normalised."""

    pools: tuple[PoolSpec, ...] = field(default_factory=lambda: (PoolSpec(),))
    final_norm: bool = True  # pass intermediate tokens through the backbone's last LayerNorm


@dataclass(frozen=True)
class EncoderPreset:
    """A named zero-shot recipe: head + input size. Weights are chosen separately."""

    name: str
    head: HeadConfig
    input_size: tuple[int, int] = (224, 224)  # (height, width); both multiples of 14
    description: str = ""


def _gem(layer: int, signed: str = "clamp", weight: float = 1.0) -> PoolSpec:
    return PoolSpec(kind="gem", layer=layer, signed=signed, weight=weight)


PRESETS: dict[str, EncoderPreset] = {
    p.name: p
    for p in [
        EncoderPreset("cls", HeadConfig((PoolSpec(kind="cls", layer=-1),)), description="last-layer class token"),
        EncoderPreset("gem", HeadConfig((_gem(-1),)), description="GeM p=3 (clamped) over last-layer patches"),
        EncoderPreset(
            "swrmac",
            HeadConfig((PoolSpec(kind="swrmac", layer=-1, levels=(1, 2, 3), level_power=6.0),)),
            description="Scale-Weighted R-MAC, levels 1-3, weight 1/l^6, last layer",
        ),
        EncoderPreset(
            "vfmloc-ref",
            HeadConfig((_gem(-1), PoolSpec(kind="swrmac", layer=-1, levels=(1, 2), level_power=6.0))),
            description="VFM-Loc reference: GeM p=3 with clamp + SW-RMAC levels [1,2], weights 1/l^6, last layer",
        ),
        EncoderPreset("gem-l8", HeadConfig((_gem(8),)), description="GeM p=3 (clamped) over block-8 patches"),
        EncoderPreset(
            "gem-l8-signed", HeadConfig((_gem(8, "signed"),)), description="signed GeM p=3 over block-8 patches"
        ),
        EncoderPreset(
            "gem-l8-raw",
            HeadConfig((_gem(8),), final_norm=False),
            description="GeM p=3 over block-8 patch tokens as they leave the block (no final LayerNorm)",
        ),
        EncoderPreset(
            "gem-l8-disc",
            HeadConfig((PoolSpec(kind="gem", layer=8, region="disc"),)),
            description="GeM p=3 over block-8 patches inside the inscribed disc (rotation hypotheses compare like with like)",
        ),
        EncoderPreset(
            "hier-l6-l8-l10",
            HeadConfig((_gem(6), _gem(8), _gem(10))),
            description="hierarchical: GeM over blocks 6, 8 and 10, concatenated",
        ),
    ]
}

# Best leak-free zero-shot descriptor on Longmont (docs/benchmarks.md): R@1 0.98 on grid-centred
# north-up WV2 crops vs 0.55 for the last-block CLS token and 0.54 for VFM-Loc's recipe.
DEFAULT_PRESET = "gem-l8-raw"


# Trainable heads and backbone fine-tuning modes (cvgl.models.trainable); named here, torch-free,
# so the training config can validate them without importing torch.
HEAD_KINDS = ("salad", "netvlad", "cls")
FINETUNE_MODES = ("frozen", "last_n", "full")
HEAD_INITS = ("random", "tokens")


@dataclass
class ModelConfig:
    """Siamese DINOv2 + aggregation head (shared by both views unless ``shared_head`` is false)."""

    weights: str = "embedded"  # embedded | PATH | hub:<arch> | random:<arch>
    finetune: str = "last_n"  # frozen | last_n | full
    last_n: int = 4
    head: str = "salad"  # salad | netvlad | cls
    num_clusters: int = 64
    cluster_dim: int = 128
    token_dim: int = 256
    dustbin: bool = True
    out_dim: int | None = 1024
    shared_head: bool = True
    dropout: float = 0.3
    query_size: tuple[int, int] = (224, 224)  # (height, width), multiples of 14
    reference_size: tuple[int, int] = (224, 224)
    # The small-data recipe (configs/longmont/small-data/): the head reads block ``block`` (1-based;
    # -1 = the last, the paper) and blocks after it are not run; ``last_n`` counts back from it.
    block: int = -1
    residual: bool = False  # start from the zero-shot GeM descriptor of that block (cvgl.models.residual_head)
    head_init: str = "random"  # training only: random | tokens (SALAD from PCA + k-means of training tokens)


def get_preset(name: str) -> EncoderPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown encoder preset '{name}'; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
