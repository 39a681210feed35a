"""Two CPU processes on gloo: one DDP step with negatives gathered across processes equals one
single-process step on the concatenated global batch; ``torchrun -m cvgl train`` runs end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import default_collate

from cvgl.train.config import config_from_dict
from cvgl.train.sampling import PairBatchSampler
from cvgl.train.trainer import Trainer

from test_trainer import tiny_config, write_pairs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(csv: Path, out: Path):
    return config_from_dict(tiny_config(csv, out, optim__warmup_epochs=0.0))


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Gradients of the step (compared instead of weights: Adam turns a float-noise gradient of a
    parameter the loss is invariant to into a full-size step of random sign)."""
    named = dict(trainer.model.named_parameters()) | {"loss.logit_scale": trainer.loss_fn.logit_scale}
    return {k: p.grad.detach().clone() for k, p in named.items() if p.grad is not None}


def _worker(rank: int, csv: str, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(_config(Path(csv), Path(out)))
    assert trainer.world.size == 2 and trainer.world.rank == rank
    trainer.sampler.set_epoch(0)
    trainer.dataset.set_epoch(0)
    local = next(iter(trainer.sampler))
    batch = default_collate([trainer.dataset[i] for i in local])
    loss = trainer._step(batch)
    torch.save({"grads": _grads(trainer), "loss": loss, "local": local}, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_step_equals_single_process_global_batch(tmp_path):
    csv = write_pairs(tmp_path / "pairs")
    out = tmp_path / "ddp"
    out.mkdir()
    torch.multiprocessing.spawn(_worker, args=(str(csv), str(out), _free_port()), nprocs=2, join=True)
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    single = Trainer(_config(csv, tmp_path / "single"))
    split = single.split
    lat, lon = split.pair_latlon()
    reference_sampler = PairBatchSampler(
        split.pair_locations(), lat, lon, 4, neighbours_per_anchor=2, dss_start_epoch=1, dss_every=1, dss_k=4, dss_K=8,
        seed=0, num_replicas=2, rank=0,
    )
    global_batch = reference_sampler.global_batches()[0].tolist()
    assert r0["local"] + r1["local"] == global_batch
    single.dataset.set_epoch(0)
    batch = default_collate([single.dataset[i] for i in global_batch])
    loss = single._step(batch)

    assert (r0["loss"] + r1["loss"]) / 2 == pytest.approx(loss, rel=1e-5)
    grads = _grads(single)
    assert grads.keys() == r0["grads"].keys() == r1["grads"].keys()
    assert any(k.startswith("backbone.blocks.") for k in grads) and any(k.startswith("heads.") for k in grads)
    for key, value in grads.items():
        torch.testing.assert_close(r0["grads"][key], r1["grads"][key], rtol=0, atol=0)  # ranks agree exactly
        scale = float(value.abs().max()) + 1e-12
        torch.testing.assert_close(r0["grads"][key], value, rtol=1e-3, atol=1e-4 * scale + 1e-7, msg=key)


def test_torchrun_cli(tmp_path):
    csv = write_pairs(tmp_path / "pairs")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(csv, tmp_path / "run", optim__epochs=1)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "cvgl", "train", str(config),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["step"] == 3  # 24 pairs / (4 per process x 2 processes) = 3 global steps
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert "R@1" in summary["metrics"]
