"""``cvgl train CONFIG.yaml``: the GenGeo training loop.

One loop for one process or many (``torchrun``): AdamW with linear warmup then cosine decay
(per step), gradient clipping, optional bf16 autocast, symmetric InfoNCE over the global batch
(descriptors gathered across processes), GPS-neighbour batches first and Dynamic Similarity
Sampling later, evaluation every N epochs, JSONL (+ TensorBoard) logs, exact resume.

The :class:`Trainer` only composes parts that each do one thing and keeps what is the loop's own:
the epoch/step loop, the step, and the DSS refresh (it re-encodes the training set between
epochs, so it needs the model, the split, the sampler and the process group at once).

* :mod:`cvgl.train.batches` - the paired dataset, its augmentation, the batch sampler;
* :mod:`cvgl.train.optim` - AdamW parameter groups and the cosine-with-warmup schedule;
* :mod:`cvgl.train.checkpoint` - exact-resume checkpoints (and :class:`TrainState`);
* :mod:`cvgl.train.run_log` - ``log.jsonl`` (+ TensorBoard), trimmed after a resume;
* :mod:`cvgl.train.evaluator` - the configured evaluation protocol, built once;
* :mod:`cvgl.train.head_init` - data-dependent head starts (NetVLAD k-means, SALAD PCA + k-means) on a new run;
* :mod:`cvgl.train.rng` - seeding and the RNG states a checkpoint carries.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from cvgl.models.gengeo import encoder_from_model, export_trained
from cvgl.models.view_heads import eval_mode
from cvgl.train.batches import build_dataset, build_sampler, steps_per_epoch
from cvgl.train.checkpoint import CHECKPOINT, Checkpoint, TrainState
from cvgl.train.config import TrainConfig, save_config
from cvgl.train.data import train_split
from cvgl.train.distributed import (
    World,
    barrier,
    broadcast_object,
    gather_numpy_rows,
    gather_with_grad,
    init_from_env,
)
from cvgl.train.evaluator import Evaluator
from cvgl.train.head_init import init_heads
from cvgl.train.loss import SymmetricInfoNCE
from cvgl.train.model import build_model
from cvgl.train.optim import build_optimizer, build_scheduler
from cvgl.train.rng import seed_everything
from cvgl.train.run_log import RunLog

EXPORT = "model.safetensors"


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs (or resumes) the loop."""

    def __init__(self, config: TrainConfig, out_dir: Path | None = None, world: World | None = None) -> None:
        self.config = config
        self.world = world or init_from_env()
        self.out = Path(out_dir or config.out_dir)
        if config.threads:
            torch.set_num_threads(config.threads)
        # Build order is part of exact reproduction: each part below may draw from the seeded generators.
        seed_everything(config.seed + self.world.rank)
        self.model, self.weights_hash = build_model(config.model, seed=config.seed)
        self.loss_fn = SymmetricInfoNCE(config.optim.temperature, config.optim.label_smoothing)
        self.split = train_split(config, self.out, self.world)
        self.dataset = build_dataset(config, self.split)
        self.sampler = build_sampler(config, self.split, self.world)
        self.steps_per_epoch = steps_per_epoch(config, self.dataset, self.sampler)
        self.optimizer = build_optimizer(self.model, self.loss_fn, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, self.steps_per_epoch)
        self.ddp = (
            DistributedDataParallel(self.model, find_unused_parameters=not config.model.shared_head)
            if self.world.distributed
            else None
        )
        self.state = TrainState()
        self.checkpoint = Checkpoint(
            self.out / CHECKPOINT, config, self.model, self.loss_fn, self.optimizer, self.scheduler, self.sampler
        )
        self.run_log = RunLog(self.out, enabled=self.world.is_main)
        # Only the main process evaluates; the others wait at the barrier in evaluate().
        self.evaluator = Evaluator(config, self.out) if self.world.is_main else None

    def save_checkpoint(self) -> None:
        if self.world.is_main:
            self.checkpoint.save(self.state)

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, resume: bool = True, stop_after_steps: int | None = None) -> dict:
        """Train to the configured number of epochs; returns the last evaluation (or {}).

        ``stop_after_steps`` ends the run early after that many steps *in this call* (after
        saving a checkpoint) — how tests and budgets cut a run; a later ``fit`` resumes it.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        if self.world.is_main:
            save_config(self.config, self.out / "config.yaml")
        restored = self.checkpoint.load() if resume else None
        if restored is not None:
            self.state = restored
            self.run_log.trim_after(self.state.step)
            self.run_log.write({"event": "resumed", "step": self.state.step, "epoch": self.state.epoch})
        else:
            init_heads(self.model, self.split, self.config)
            if self.config.eval.at_start:
                self.evaluate()
        if self.config.tensorboard:
            self.run_log.open_tensorboard()
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
                    self.run_log.write({
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
        self.run_log.close()
        return self.state.history[-1] if self.state.history else {}

    def _step(self, batch: dict) -> float:
        cfg = self.config.optim
        network = self.ddp or self.model
        queries = batch["query"]
        if "query_wrong" in batch:  # one forward for the photos and their wrong-heading versions
            queries = torch.cat([queries, batch["query_wrong"]])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            query, reference = network(queries, batch["reference"])
        query, reference = query.float(), reference.float()
        query, wrong = query[: len(reference)], (query[len(reference):] if "query_wrong" in batch else None)
        q_all = gather_with_grad(query, self.world)
        r_all = gather_with_grad(reference, self.world)
        offset = self.world.rank * len(query)
        loss = self.loss_fn(query, reference, q_all=q_all, r_all=r_all, offset=offset, wrong=wrong)
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
        from cvgl.train.sampling import similarity_neighbours

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
        if self.evaluator is not None:
            started = time.time()
            with eval_mode(self.model):
                metrics = self.evaluator.evaluate(*self.encoders())
            result = {"epoch": self.state.epoch, "step": self.state.step, "eval_seconds": round(time.time() - started, 1), "metrics": metrics}
            self.state.history.append(result)
            self.run_log.write({"event": "eval", **result})
        barrier(self.world)
        return result
