"""What the loop iterates over: the paired dataset (with its augmentation) and the batch sampler.

Both are built here from the config so the mapping from config fields to sampler arguments has
one home, and the schedule's epoch length is checked once, with a one-line error, before any
optimizer exists.
"""

from __future__ import annotations

import numpy as np

from cvgl.data.augment import PairedAugment
from cvgl.data.datasets.common import CrossViewSplit, PairDataset
from cvgl.errors import InputError
from cvgl.train.config import TrainConfig
from cvgl.train.distributed import World
from cvgl.train.sampling import PairBatchSampler


def augment_kind(split: CrossViewSplit) -> str:
    """A street panorama turns with its tile by rolling; drone and satellite views rotate alike."""
    return "panorama" if split.query_view == "street" else "aerial"


def build_dataset(config: TrainConfig, split: CrossViewSplit) -> PairDataset:
    kind = augment_kind(split)
    rotation = config.data.query_rotation_deg if kind == "aerial" else 0.0
    augment = PairedAugment(kind=kind, seed=config.seed, query_rotation_deg=rotation) if config.data.augment else None
    return PairDataset(split, config.model.query_size, config.model.reference_size, augment,
                       wrong_headings=config.data.wrong_headings > 0)


def build_sampler(config: TrainConfig, split: CrossViewSplit, world: World) -> PairBatchSampler:
    """GPS-neighbour batches when every pair has coordinates (else random), DSS from ``dss_start_epoch``."""
    lat, lon = split.pair_latlon()
    s = config.sampling
    return PairBatchSampler(
        split.pair_locations(),
        lat if s.gps and np.isfinite(lat).all() else None,
        lon if s.gps and np.isfinite(lon).all() else None,
        config.optim.batch_size,
        neighbours_per_anchor=s.gps_neighbours,
        dss_start_epoch=s.dss_start_epoch,
        dss_every=s.dss_every,
        dss_k=s.dss_k,
        dss_K=s.dss_K,
        seed=config.seed,
        num_replicas=world.size,
        rank=world.rank,
    )


def steps_per_epoch(config: TrainConfig, dataset: PairDataset, sampler: PairBatchSampler) -> int:
    """Batches per epoch, for the schedule: pairs over the global batch.

    The sampler may make one less when locations repeat; it cannot count DSS batches before the
    first refresh, so the schedule uses this fixed count.
    """
    steps = len(dataset) // sampler.global_batch_size
    if steps == 0:
        raise InputError(
            f"{config.data.kind}: {len(dataset)} training pairs make no batch of {config.optim.batch_size}; "
            "lower optim.batch_size or add pairs"
        )
    return steps
