"""Data-parallel plumbing for ``torchrun``: process group, rank helpers, and gathering with gradients.

InfoNCE improves with more negatives, so each process's descriptors are all-gathered *with
gradients* (``torch.distributed.nn.functional.all_gather``): every process scores its queries
against the whole global batch, and the backward pass returns each process the gradient its
outputs received from every other process's loss. With DDP averaging parameter gradients, one
step equals a single-process step on the concatenated global batch (tested).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_from_env() -> World:
    """Join the process group ``torchrun`` describes (gloo on CPU, NCCL on GPUs); else one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return World(dist.get_rank(), dist.get_world_size())


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def gather_with_grad(x: torch.Tensor, world: World) -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0, differentiable (rank order)."""
    if not world.distributed:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def gather_numpy_rows(rows, world: World):
    """Concatenate per-process numpy arrays (rank order) on every process, without gradients."""
    import numpy as np

    if not world.distributed:
        return rows
    parts: list = [None] * world.size
    dist.all_gather_object(parts, rows)
    return np.concatenate(parts)


def broadcast_object(value, world: World):
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
