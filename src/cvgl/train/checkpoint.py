"""One file that lets a run continue exactly where it stopped.

Exact resume: a checkpoint holds the model, the loss (its temperature), optimizer, scheduler,
sampler state (neighbour tables and the position inside the epoch), every RNG state and the
loop's :class:`TrainState`. With augmentation a function of ``(seed, epoch, index)``, a run
stopped at any checkpoint and resumed produces the same weights as one that never stopped
(tested, ``num_workers=0``). The file is written atomically, so a run killed mid-save keeps its
previous checkpoint. The blob layout below is what existing ``checkpoint.pt`` files hold:
change it only with a reader for the old one.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from cvgl.errors import InputError
from cvgl.io import write_bytes_atomic
from cvgl.train.config import TrainConfig
from cvgl.train.rng import rng_state, set_rng_state

if TYPE_CHECKING:
    from cvgl.train.sampling import PairBatchSampler

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainState:
    """Where the loop is; everything else a resume needs lives in the modules' state dicts."""

    epoch: int = 0  # the epoch in progress (or next to run)
    step: int = 0  # optimizer steps done in total
    batch_in_epoch: int = 0  # batches of ``epoch`` already consumed
    history: list[dict] = field(default_factory=list)  # evaluation results


class Checkpoint:
    """Saves and restores the parts of one run at ``path``; the caller decides which process saves."""

    def __init__(
        self,
        path: Path,
        config: TrainConfig,
        model: nn.Module,
        loss: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        sampler: PairBatchSampler,
    ) -> None:
        self.path = Path(path)
        self.config = config
        self.model = model
        self.loss = loss
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.sampler = sampler

    def save(self, state: TrainState) -> None:
        blob = {
            "model": self.model.state_dict(),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(batches_done=state.batch_in_epoch),
            "rng": rng_state(),
            "state": {
                "epoch": state.epoch,
                "step": state.step,
                "batch_in_epoch": state.batch_in_epoch,
                "history": json.dumps(state.history),  # JSON text, as existing checkpoints hold it
            },
            "config": json.dumps(self.config.to_dict()),
        }
        buffer = io.BytesIO()
        torch.save(blob, buffer)
        write_bytes_atomic(self.path, buffer.getvalue())

    def load(self, path: Path | None = None) -> TrainState | None:
        """Restore every part from ``path`` (default: this run's) and return the loop state; None if absent.

        A damaged file, or one from another model config, is a one-line :class:`InputError`.
        """
        path = Path(path or self.path)
        if not path.is_file():
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(blob["model"])
            self.loss.load_state_dict(blob["loss"])
            self.optimizer.load_state_dict(blob["optimizer"])
            self.scheduler.load_state_dict(blob["scheduler"])
            self.sampler.load_state_dict(blob["sampler"])
            set_rng_state(blob["rng"])
            state = blob["state"]
        except Exception as exc:  # noqa: BLE001 - a damaged checkpoint is a user-facing input error
            reason = " ".join(str(exc).split())  # torch's load errors run to many lines; keep one
            raise InputError(f"{path}: cannot resume from this checkpoint ({type(exc).__name__}: {reason})") from None
        saved = json.loads(blob["config"])
        if saved.get("model") != self.config.to_dict()["model"]:
            raise InputError(f"{path}: checkpoint was trained with another model config; use a new out_dir")
        return TrainState(state["epoch"], state["step"], state["batch_in_epoch"], json.loads(state["history"]))
