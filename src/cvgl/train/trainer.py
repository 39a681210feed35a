"""``cvgl train CONFIG.yaml``: the GenGeo training loop.

One loop for one process or many (``torchrun``): AdamW with linear warmup then cosine decay
(per step), gradient clipping, optional bf16 autocast, symmetric InfoNCE over the global batch
(descriptors gathered across processes), GPS-neighbour batches first and Dynamic Similarity
Sampling later, evaluation every N epochs, JSONL (+ TensorBoard) logs.

Exact resume: a checkpoint holds the model, optimizer, scheduler, loss temperature, sampler
state (neighbour tables and the position inside the epoch), every RNG state and the step. The
augmentation of sample ``i`` in epoch ``e`` is a function of ``(seed, e, i)``, so a run stopped
at any checkpoint and resumed produces the same weights as one that never stopped (tested,
``num_workers=0``). Checkpoints, the exported model and logs are written atomically.
"""

from __future__ import annotations

import io
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from cvgl.errors import InputError
from cvgl.io import write_bytes_atomic, write_text_atomic
from cvgl.models.gengeo import encoder_from_model, export_trained
from cvgl.models.view_heads import eval_mode
from cvgl.train.config import TrainConfig, save_config
from cvgl.train.distributed import (
    World,
    barrier,
    broadcast_object,
    gather_numpy_rows,
    gather_with_grad,
    init_from_env,
)
from cvgl.train.loss import SymmetricInfoNCE
from cvgl.train.model import build_model

CHECKPOINT = "checkpoint.pt"
EXPORT = "model.safetensors"
LOG = "log.jsonl"


def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Learning-rate factor: linear 0->1 over ``warmup`` steps, then cosine 1->``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress (or next to run)
    step: int = 0  # optimizer steps done in total
    batch_in_epoch: int = 0  # batches of ``epoch`` already consumed
    history: list[dict] = field(default_factory=list)  # evaluation results


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs (or resumes) the loop."""

    def __init__(self, config: TrainConfig, out_dir: Path | None = None, world: World | None = None) -> None:
        from cvgl.data.augment import PairedAugment
        from cvgl.data.datasets.common import PairDataset
        from cvgl.train.data import train_split
        from cvgl.train.sampling import PairBatchSampler

        self.config = config
        self.world = world or init_from_env()
        self.out = Path(out_dir or config.out_dir)
        if config.threads:
            torch.set_num_threads(config.threads)
        seed_everything(config.seed + self.world.rank)
        self.model, self.weights_hash = build_model(config.model, seed=config.seed)
        self.loss_fn = SymmetricInfoNCE(config.optim.temperature, config.optim.label_smoothing)
        self.split = train_split(config, self.out, self.world)
        augment = PairedAugment(kind=self._augment_kind(), seed=config.seed) if config.data.augment else None
        self.dataset = PairDataset(self.split, config.model.query_size, config.model.reference_size, augment)
        lat, lon = self.split.pair_latlon()
        s = config.sampling
        self.sampler = PairBatchSampler(
            self.split.pair_locations(),
            lat if s.gps and np.isfinite(lat).all() else None,
            lon if s.gps and np.isfinite(lon).all() else None,
            config.optim.batch_size,
            neighbours_per_anchor=s.gps_neighbours,
            dss_start_epoch=s.dss_start_epoch,
            dss_every=s.dss_every,
            dss_k=s.dss_k,
            dss_K=s.dss_K,
            seed=config.seed,
            num_replicas=self.world.size,
            rank=self.world.rank,
        )
        # Batches per epoch, for the schedule: pairs over the global batch (the sampler may make
        # one less when locations repeat; it cannot count DSS batches before the first refresh).
        self.steps_per_epoch = len(self.dataset) // self.sampler.global_batch_size
        if self.steps_per_epoch == 0:
            raise InputError(
                f"{config.data.kind}: {len(self.dataset)} training pairs make no batch of {config.optim.batch_size}; "
                "lower optim.batch_size or add pairs"
            )
        lr = config.optim.learning_rate
        backbone = [p for p in self.model.backbone.parameters() if p.requires_grad]
        head = list(self.model.heads.parameters()) + list(self.loss_fn.parameters())
        groups = [{"params": head, "lr": lr * config.optim.head_lr_scale}]
        if backbone:
            groups.insert(0, {"params": backbone, "lr": lr})
        self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=config.optim.weight_decay)
        total = self.steps_per_epoch * config.optim.epochs
        warmup = int(round(config.optim.warmup_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: cosine_with_warmup(step, total, warmup, config.optim.min_lr_ratio)
        )
        self.ddp = (
            DistributedDataParallel(self.model, find_unused_parameters=not config.model.shared_head)
            if self.world.distributed
            else None
        )
        self.state = TrainState()
        self._tb = None
        # Build the evaluation protocol now: its photos are made once, and every module it needs
        # is imported before training starts (not half-way through a long run).
        # The test split is read once here too, not again at every evaluation.
        self._evaluator = None
        self._test_split = None
        if self.world.is_main:
            if config.eval.protocol == "longmont":
                from cvgl.evaluate.longmont import LongmontProtocol

                self._evaluator = LongmontProtocol(config.eval.per_family, config.eval.families, seed=0)
            else:
                from cvgl.train.data import test_split

                self._test_split = test_split(config, self.out)

    @torch.no_grad()
    def _init_netvlad(self, images: int = 64) -> None:
        """NetVLAD starts from k-means centroids of training patch tokens (as in NetVLAD);
        SALAD and CLS heads need no data to start."""
        from cvgl.data.datasets.common import load_resized
        from cvgl.models.netvlad import NetVLAD

        heads = [h for h in (self.model.heads.query, self.model.heads.reference) if isinstance(h, NetVLAD)]
        if not heads:
            return
        pairs = self.split.pairs()
        pick = np.random.default_rng(self.config.seed).permutation(len(pairs))[:images]
        # Both views' tokens when they share an input size (a shared head clusters both), else tiles only.
        size = self.config.model.reference_size
        paths = [self.split.references[pairs[i][1]].path for i in pick]
        if self.config.model.query_size == size:
            half = len(pick) // 2
            paths = [self.split.queries[pairs[i][0]].path for i in pick[:half]] + paths[half:]
        batch = torch.stack([load_resized(path, size) for path in paths])
        with eval_mode(self.model):
            patches = self.model.tokens(batch).patches  # [B, C, h, w]
        features = patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1])
        for head in heads:
            head.init_from_features(features, seed=self.config.seed)

    def _augment_kind(self) -> str:
        return "panorama" if self.split.query_view == "street" else "aerial"

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def save_checkpoint(self) -> None:
        if not self.world.is_main:
            return
        blob = {
            "model": self.model.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(batches_done=self.state.batch_in_epoch),
            "rng": rng_state(),
            "state": {
                "epoch": self.state.epoch,
                "step": self.state.step,
                "batch_in_epoch": self.state.batch_in_epoch,
                "history": json.dumps(self.state.history),
            },
            "config": json.dumps(self.config.to_dict()),
        }
        buffer = io.BytesIO()
        torch.save(blob, buffer)
        write_bytes_atomic(self.checkpoint_path(), buffer.getvalue())

    def load_checkpoint(self, path: Path | None = None) -> bool:
        """Restore everything from ``path`` (default: this run's checkpoint); False if absent."""
        path = Path(path or self.checkpoint_path())
        if not path.is_file():
            return False
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(blob["model"])
            self.loss_fn.load_state_dict(blob["loss"])
            self.optimizer.load_state_dict(blob["optimizer"])
            self.scheduler.load_state_dict(blob["scheduler"])
            self.sampler.load_state_dict(blob["sampler"])
            set_rng_state(blob["rng"])
            state = blob["state"]
        except Exception as exc:  # noqa: BLE001 - a damaged checkpoint is a user-facing input error
            raise InputError(f"{path}: cannot resume from this checkpoint ({type(exc).__name__}: {exc})") from None
        saved = json.loads(blob["config"])
        if saved.get("model") != self.config.to_dict()["model"]:
            raise InputError(f"{path}: checkpoint was trained with another model config; use a new out_dir")
        self.state = TrainState(state["epoch"], state["step"], state["batch_in_epoch"], json.loads(state["history"]))
        return True

    # -- logging -----------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        if not self.world.is_main:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.out / LOG, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("time", "step", "epoch"):
                    self._tb.add_scalar(key, value, record.get("step", 0))

    def _trim_log(self) -> None:
        """After a resume, drop log lines written after the checkpoint (they will be redone)."""
        path = self.out / LOG
        if not self.world.is_main or not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= self.state.step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    def _open_tensorboard(self) -> None:
        if not (self.world.is_main and self.config.tensorboard):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional; JSONL is always written
            return
        self._tb = SummaryWriter(str(self.out / "tensorboard"))

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, resume: bool = True, stop_after_steps: int | None = None) -> dict:
        """Train to the configured number of epochs; returns the last evaluation (or {}).

        ``stop_after_steps`` ends the run early after that many steps *in this call* (after
        saving a checkpoint) — how tests and budgets cut a run; a later ``fit`` resumes it.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        if self.world.is_main:
            save_config(self.config, self.out / "config.yaml")
        if resume and self.load_checkpoint():
            self._trim_log()
            self.log({"event": "resumed", "step": self.state.step, "epoch": self.state.epoch})
        else:
            self._init_netvlad()  # a resumed run has its centroids in the checkpoint
        self._open_tensorboard()
        started = time.time()
        steps_this_call = 0
        cfg = self.config.optim
        while self.state.epoch < cfg.epochs:
            epoch = self.state.epoch
            self.sampler.set_epoch(epoch)
            self.dataset.set_epoch(epoch)
            if self.state.batch_in_epoch == 0 and self.sampler.needs_similarity(epoch):
                self._refresh_similarity()
            loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=self.config.data.num_workers)
            self.model.train()
            for batch in loader:
                loss = self._step(batch)
                self.state.batch_in_epoch += 1
                self.state.step += 1
                steps_this_call += 1
                if self.state.step % self.config.log_every_steps == 0 or self.state.batch_in_epoch == self.steps_per_epoch:
                    self.log({
                        "step": self.state.step, "epoch": epoch, "loss": loss,
                        "lr": self.scheduler.get_last_lr()[0], "temperature": 1.0 / float(self.loss_fn.scale.detach()),
                        "seconds": round(time.time() - started, 1),
                    })
                every = self.config.checkpoint_every_steps
                if every and self.state.step % every == 0 and self.state.batch_in_epoch < self.steps_per_epoch:
                    self.save_checkpoint()
                if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                    self.save_checkpoint()
                    barrier(self.world)
                    return {}
            self.state.epoch += 1
            self.state.batch_in_epoch = 0
            if self.state.epoch % self.config.eval.every_epochs == 0 or self.state.epoch == cfg.epochs:
                self.evaluate()
            self.save_checkpoint()
            if self.world.is_main:
                export_trained(self.model, self.out / EXPORT, self.config.name, {"epoch": self.state.epoch, "step": self.state.step})
            barrier(self.world)
        if self._tb is not None:
            self._tb.close()
        return self.state.history[-1] if self.state.history else {}

    def _step(self, batch: dict) -> float:
        cfg = self.config.optim
        network = self.ddp or self.model
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            query, reference = network(batch["query"], batch["reference"])
        query, reference = query.float(), reference.float()
        q_all = gather_with_grad(query, self.world)
        r_all = gather_with_grad(reference, self.world)
        offset = self.world.rank * len(query)
        loss = self.loss_fn(query, reference, q_all=q_all, r_all=r_all, offset=offset)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world.distributed:
            # DDP averages the backbone/head gradients; the loss's temperature is outside DDP.
            for p in self.loss_fn.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.world.size
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())

    @torch.inference_mode()
    def _refresh_similarity(self) -> None:
        """Dynamic Similarity Sampling: re-encode every training pair (each process a share)."""
        from cvgl.evaluate.retrieval import encode_paths

        pairs = self.split.pairs()
        mine = list(range(self.world.rank, len(pairs), self.world.size))
        batch = max(2, self.config.optim.batch_size)
        with eval_mode(self.model):
            query, reference = self.encoders()
            q_desc = encode_paths(query, [self.split.queries[pairs[i][0]].path for i in mine], batch)
            r_desc = encode_paths(reference, [self.split.references[pairs[i][1]].path for i in mine], batch)
        order = gather_numpy_rows(np.array(mine, dtype=np.int64), self.world)
        q_desc = gather_numpy_rows(q_desc, self.world)
        r_desc = gather_numpy_rows(r_desc, self.world)
        table = None
        if self.world.is_main:
            from cvgl.train.sampling import similarity_neighbours

            inverse = np.argsort(order)
            table = similarity_neighbours(q_desc[inverse], r_desc[inverse], self.sampler.dss_K)
        # One table for every rank, so all build the same global batches.
        self.sampler.set_similarity_table(broadcast_object(table, self.world))

    def encoders(self):
        """(query encoder, reference encoder) sharing this model's modules (use under eval_mode)."""
        query = encoder_from_model(self.model, "query", self.weights_hash, self.config.name)
        reference = encoder_from_model(self.model, "reference", self.weights_hash, self.config.name)
        return query, reference

    def evaluate(self) -> dict:
        """Run the configured protocol on the main process; others wait. Logged and kept in history."""
        result: dict = {}
        if self.world.is_main:
            from cvgl.evaluate.retrieval import evaluate_split

            started = time.time()
            with eval_mode(self.model):
                query, reference = self.encoders()
                if self._evaluator is not None:
                    metrics = self._evaluator.evaluate(query, reference)
                else:
                    metrics = evaluate_split(query, reference, self._test_split)
            result = {"epoch": self.state.epoch, "step": self.state.step, "eval_seconds": round(time.time() - started, 1), "metrics": metrics}
            self.state.history.append(result)
            self.log({"event": "eval", **result})
        barrier(self.world)
        return result


