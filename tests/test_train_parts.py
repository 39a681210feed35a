"""The Trainer's parts on their own, without a model or a run: schedule, parameter groups,
checkpoint round trip and its one-line errors, the run log and its trim after a resume."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from cvgl.errors import InputError
from cvgl.train.checkpoint import Checkpoint, TrainState
from cvgl.train.config import OptimConfig, TrainConfig
from cvgl.train.optim import (
    build_optimizer,
    build_scheduler,
    cosine_with_warmup,
    param_groups,
)
from cvgl.train.run_log import RunLog
from cvgl.train.sampling import PairBatchSampler


class TinyModel(nn.Module):
    """What the optimizer reads of a GeoModel: a backbone (part frozen) and heads."""

    def __init__(self, frozen: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
        self.heads = nn.Linear(3, 2)
        self.backbone[0].requires_grad_(False)
        if frozen:
            self.backbone.requires_grad_(False)


def _parts(config: TrainConfig):
    model, loss = TinyModel(), nn.Linear(1, 1)
    optimizer = build_optimizer(model, loss, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, steps_per_epoch=4)
    sampler = PairBatchSampler(np.arange(8), None, None, 2, seed=3)
    return model, loss, optimizer, scheduler, sampler


def test_param_groups_order_and_rates():
    config = OptimConfig(learning_rate=1e-3, head_lr_scale=10.0)
    model, loss = TinyModel(), nn.Linear(1, 1)
    backbone, head = param_groups(model, loss, config)
    assert [id(p) for p in backbone["params"]] == [id(p) for p in model.backbone[1].parameters()]  # trainable only
    assert [id(p) for p in head["params"]] == [id(p) for p in [*model.heads.parameters(), *loss.parameters()]]
    assert (backbone["lr"], head["lr"]) == (1e-3, pytest.approx(1e-2))
    (only,) = param_groups(TinyModel(frozen=True), loss, config)  # frozen backbone: heads alone
    assert len(only["params"]) == 4


def test_scheduler_follows_cosine_with_warmup_and_saves_no_function_state():
    config = OptimConfig(epochs=3, learning_rate=1.0, warmup_epochs=0.5, min_lr_ratio=0.1)
    model = TinyModel()
    optimizer = build_optimizer(model, nn.Linear(1, 1), config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=4)
    seen = []
    for _ in range(12):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([cosine_with_warmup(s, 12, 2, 0.1) for s in range(12)])
    assert scheduler.state_dict()["lr_lambdas"] == [None, None]  # checkpoints hold only the position


def test_checkpoint_round_trip_restores_parts_rng_and_state(tmp_path):
    config = TrainConfig()
    model, loss, optimizer, scheduler, sampler = _parts(config)
    model.heads(model.backbone(torch.ones(1, 3))).sum().backward()
    optimizer.step()
    scheduler.step()
    sampler.set_epoch(1)
    state = TrainState(epoch=1, step=5, batch_in_epoch=1, history=[{"epoch": 1, "metrics": {"R@1": 0.5}}])
    checkpoint = Checkpoint(tmp_path / "checkpoint.pt", config, model, loss, optimizer, scheduler, sampler)
    checkpoint.save(state)
    expected = (torch.rand(3), np.random.rand(3), random.random())

    fresh = _parts(config)
    restored = Checkpoint(tmp_path / "checkpoint.pt", config, *fresh).load()
    assert restored == state
    assert torch.equal(torch.rand(3), expected[0])  # the global generators continue where they were saved
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
    for a, b in zip(model.state_dict().values(), fresh[0].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert fresh[2].state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    assert fresh[3].last_epoch == scheduler.last_epoch == 1
    assert fresh[4].state_dict() == sampler.state_dict(batches_done=1)
    assert Checkpoint(tmp_path / "absent.pt", config, *fresh).load() is None


def test_checkpoint_errors_name_the_file(tmp_path):
    config = TrainConfig()
    path = tmp_path / "checkpoint.pt"
    Checkpoint(path, config, *_parts(config)).save(TrainState())
    other = TrainConfig()
    other.model.out_dim = 7  # same tensors here, but another model config: refused
    with pytest.raises(InputError, match="another model config") as error:
        Checkpoint(path, other, *_parts(other)).load()
    assert str(path) in str(error.value)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot resume from this checkpoint") as error:
        Checkpoint(path, config, *_parts(config)).load()
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_run_log_writes_trims_and_stays_silent_off_main(tmp_path):
    log = RunLog(tmp_path)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step})
    log.write({"event": "eval", "epoch": 1, "step": 3})
    log.write({"event": "note"})  # no step: kept by any trim
    log.trim_after(2)
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in lines] == [1, 2, None]
    assert all(next(iter(r)) == "time" for r in lines)
    quiet = RunLog(tmp_path / "rank1", enabled=False)
    quiet.write({"step": 1})
    quiet.trim_after(0)
    quiet.open_tensorboard()
    assert not (tmp_path / "rank1").exists()
