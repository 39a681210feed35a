"""The training loop on a tiny random ViT: runs, logs, exports, resumes exactly, trains only what it should."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import textured_rgb
from PIL import Image

from cvgl.train.batches import augment_kind
from cvgl.train.config import config_from_dict
from cvgl.train.head_init import init_heads
from cvgl.train.trainer import Trainer


def write_pairs(folder: Path, n: int = 24, seed: int = 0) -> Path:
    """``n`` pairs: a reference crop and a darker, noisier copy of it as the query; grid positions."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    scene = textured_rgb(400, 400, seed=seed).transpose(1, 2, 0)
    rows = ["query,reference,lat,lon"]
    for i in range(n):
        y, x = rng.integers(0, 400 - 64, size=2)
        ref = scene[y : y + 64, x : x + 64]
        query = np.clip(ref * 0.8 + rng.normal(0, 12, ref.shape), 0, 255).astype(np.uint8)
        Image.fromarray(ref).save(folder / f"r{i}.png")
        Image.fromarray(query).save(folder / f"q{i}.png")
        rows.append(f"q{i}.png,r{i}.png,{40.1 + (i % 6) * 1e-3:.6f},{-105.1 + (i // 6) * 1e-3:.6f}")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


def tiny_config(csv: Path, out: Path, **changes) -> dict:
    config = {
        "name": "tiny",
        "seed": 0,
        "out_dir": str(out),
        "threads": 1,
        "log_every_steps": 1,
        "tensorboard": False,
        "model": {
            "weights": "random:dinov2_tiny_test", "finetune": "last_n", "last_n": 1, "head": "salad",
            "num_clusters": 4, "cluster_dim": 8, "token_dim": 8, "out_dim": 16, "dropout": 0.0,
            "query_size": [56, 56], "reference_size": [56, 56],
        },
        "data": {"kind": "pairs-csv", "root": str(csv), "augment": True},
        "optim": {"epochs": 2, "batch_size": 4, "learning_rate": 1e-3, "warmup_epochs": 0.5},
        "sampling": {"gps_neighbours": 2, "dss_start_epoch": 1, "dss_every": 1, "dss_k": 4, "dss_K": 8},
        "eval": {"every_epochs": 1, "protocol": "split"},
    }
    for dotted, value in changes.items():
        if "__" not in dotted:
            config[dotted] = value
            continue
        section, key = dotted.split("__")
        config[section][key] = value
    return config


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs"))


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_fit_logs_evaluates_and_exports(pairs_csv, tmp_path):
    trainer = Trainer(config_from_dict(tiny_config(pairs_csv, tmp_path / "run")))
    result = trainer.fit()
    out = tmp_path / "run"
    assert {"config.yaml", "checkpoint.pt", "model.safetensors", "log.jsonl"} <= {p.name for p in out.iterdir()}
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert len(steps) == trainer.state.step == 2 * trainer.steps_per_epoch
    assert all(np.isfinite(r["loss"]) for r in steps)
    evals = [r for r in lines if r.get("event") == "eval"]
    assert [e["epoch"] for e in evals] == [1, 2]
    metrics = result["metrics"]
    assert {"R@1", "R@5", "R@10", "R@1%", "mAP", "median_error_m"} <= set(metrics)
    assert 0.0 <= metrics["R@1"] <= 1.0


def test_resume_mid_epoch_is_exact(pairs_csv, tmp_path):
    """Stop in the middle of epoch 2 (after a DSS refresh), resume in a new Trainer: same weights."""
    config = config_from_dict(tiny_config(pairs_csv, tmp_path / "straight"))
    straight = Trainer(config)
    straight.fit()

    config_b = config_from_dict(tiny_config(pairs_csv, tmp_path / "stopped"))
    first = Trainer(config_b)
    stop_at = first.steps_per_epoch + 2
    assert first.fit(stop_after_steps=stop_at) == {}
    assert first.state.step == stop_at
    resumed = Trainer(config_b)
    resumed.fit()
    assert resumed.state.step == straight.state.step
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(straight.loss_fn.logit_scale, resumed.loss_fn.logit_scale)
    steps_a = [r["loss"] for r in map(json.loads, (tmp_path / "straight" / "log.jsonl").read_text().splitlines()) if "loss" in r]
    steps_b = [r["loss"] for r in map(json.loads, (tmp_path / "stopped" / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps_a == steps_b


@pytest.mark.parametrize("mode, n, trained_blocks", [("frozen", 0, set()), ("last_n", 1, {1}), ("full", 0, {0, 1})])
def test_only_trainable_blocks_change(pairs_csv, tmp_path, mode, n, trained_blocks):
    config = config_from_dict(tiny_config(pairs_csv, tmp_path / mode, model__finetune=mode, model__last_n=max(n, 1)))
    trainer = Trainer(config)
    before = _state(trainer)
    trainer.fit(stop_after_steps=2)
    after = _state(trainer)
    changed_blocks = {int(k.split(".")[2]) for k in before if k.startswith("backbone.blocks.") and not torch.equal(before[k], after[k])}
    assert changed_blocks == trained_blocks
    assert torch.equal(before["backbone.patch_embed.proj.weight"], after["backbone.patch_embed.proj.weight"]) == (mode != "full")
    head_changed = any(not torch.equal(before[k], after[k]) for k in before if k.startswith("heads."))
    assert head_changed


def test_loss_falls_when_overfitting_a_fixed_set(pairs_csv, tmp_path):
    config = config_from_dict(
        tiny_config(pairs_csv, tmp_path / "fit", optim__epochs=6, optim__learning_rate=3e-3, data__augment=False, eval__every_epochs=6)
    )
    trainer = Trainer(config)
    trainer.fit()
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "fit" / "log.jsonl").read_text().splitlines()) if "loss" in r]
    per_epoch = np.array(losses).reshape(6, -1).mean(1)
    assert per_epoch[-1] < per_epoch[0] * 0.9


def test_export_plugs_into_create_encoder(pairs_csv, tmp_path):
    from cvgl.models.factory import create_encoder

    trainer = Trainer(config_from_dict(tiny_config(pairs_csv, tmp_path / "run", optim__epochs=1)))
    trainer.fit()
    export = tmp_path / "run" / "model.safetensors"
    reference = create_encoder("gem-l8-raw", str(export), view="reference")
    query = create_encoder("cls", str(export), view="query")
    assert reference.identity == query.identity
    assert reference.identity.preset == "tiny" and "trained" in reference.identity.head
    image = np.asarray(Image.open(pairs_csv.parent / "r0.png").convert("RGB"))
    desc = reference.encode([image])
    assert desc.shape == (1, 16)
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model.encode(reference.to_tensor(image)[None], "reference").numpy()
    np.testing.assert_allclose(desc, expected, atol=1e-5)


@pytest.mark.parametrize(
    "kind, options, panorama",
    [
        ("cvusa", {}, True),
        ("cvact", {}, True),
        ("vigor", {"area": "same"}, True),
        ("university1652", {"query_view": "drone", "reference_view": "satellite"}, False),
    ],
)
def test_trains_and_evaluates_on_benchmark_layouts(tmp_path, kind, options, panorama):
    """Each published layout (fixture tree made by code) trains one epoch and evaluates its test split."""
    import data.make_fixtures as fixtures

    root = tmp_path / kind
    getattr(fixtures, f"make_{kind}")(root)
    config = tiny_config(root, tmp_path / "run", optim__epochs=1, optim__batch_size=2)
    config["data"] = {"kind": kind, "root": str(root), "options": options, "augment": True}
    config["model"]["query_size"] = [28, 56] if panorama else [28, 28]
    config["model"]["reference_size"] = [28, 28]
    trainer = Trainer(config_from_dict(config))
    assert augment_kind(trainer.split) == ("panorama" if panorama else "aerial")
    result = trainer.fit()
    metrics = result["metrics"]
    assert 0.0 <= metrics["R@1"] <= metrics["R@5"] <= 1.0 and "mAP" in metrics
    assert ("hit_rate" in metrics) == (kind == "vigor")
    assert ("median_error_m" in metrics) == (kind in ("cvact", "vigor"))


def test_trained_model_through_cli_index_and_locate(pairs_csv, tmp_path, utm_geotiff, capsys):
    """`cvgl index --weights model.safetensors` then `cvgl locate` with the same file: unchanged commands."""
    from cvgl.cli import main

    trainer = Trainer(config_from_dict(tiny_config(pairs_csv, tmp_path / "run", optim__epochs=1, model__shared_head=False)))
    trainer.fit()
    export = str(tmp_path / "run" / "model.safetensors")
    index = tmp_path / "index"
    args = ["index", str(utm_geotiff), "--out", str(index), "--weights", export, "--tile-m", "56", "--stride-m", "28", "--gsd", "1"]
    assert main(args) == 0
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["encoder"]["preset"] == "tiny" and manifest["dim"] == 16
    photo = tmp_path / "photo.png"
    with Image.open(utm_geotiff) as image:
        image.convert("RGB").crop((40, 40, 96, 96)).save(photo)
    capsys.readouterr()
    assert main(["locate", str(index), str(photo), "--weights", export, "--view", "aerial"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"lat", "lon", "confidence", "top_k"} <= set(result)
    # Another model (different weights) is refused, naming the index.
    other = Trainer(config_from_dict(tiny_config(pairs_csv, tmp_path / "other", optim__epochs=1, seed=1)))
    other.fit()
    assert main(["locate", str(index), str(photo), "--weights", str(tmp_path / "other" / "model.safetensors")]) == 2
    assert "differs" in capsys.readouterr().err


def test_tensorboard_events_beside_jsonl(pairs_csv, tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    trainer = Trainer(config_from_dict(tiny_config(pairs_csv, tmp_path / "run", optim__epochs=1, tensorboard=True)))
    trainer.fit()
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_explain_draws_dustbin_and_cluster_figure(pairs_csv, tmp_path, capsys):
    from cvgl.cli import main
    from cvgl.models.gengeo import load_trained
    from cvgl.viz.assignments import assignment_summary

    Trainer(config_from_dict(tiny_config(pairs_csv, tmp_path / "run", optim__epochs=1))).fit()
    export = tmp_path / "run" / "model.safetensors"
    out = tmp_path / "fig.png"
    assert main(["explain", str(export), str(pairs_csv.parent / "q0.png"), str(pairs_csv.parent / "r0.png"), "--out", str(out)]) == 0
    with Image.open(out) as figure:
        assert figure.size[0] > 400 and figure.size[1] > 400
    model, _, _ = load_trained(export)
    image = torch.rand(3, 56, 56)
    summary = assignment_summary(model, image, image)
    assert summary["query"].keep.shape == (4, 4) and 0.0 <= summary["query"].keep.min() <= summary["query"].keep.max() <= 1.0
    np.testing.assert_allclose(summary["query"].clusters.sum(), 1.0, atol=1e-5)
    assert summary["cluster_overlap"] == pytest.approx(1.0, abs=1e-5)  # shared head, same image
    assert main(["explain", str(pairs_csv), str(pairs_csv), str(pairs_csv), "--out", str(out)]) == 2
    assert "not a model written by cvgl train" in capsys.readouterr().err


def test_netvlad_starts_from_kmeans_of_training_tokens(pairs_csv, tmp_path):
    from cvgl.models.netvlad import NetVLAD, NetVLADConfig

    config = config_from_dict(tiny_config(pairs_csv, tmp_path / "run", optim__epochs=1, model__head="netvlad"))
    trainer = Trainer(config)
    init_heads(trainer.model, trainer.split, config)  # what fit() does first on a new run (a resumed one loads its centroids)
    head = trainer.model.heads.query
    assert isinstance(head, NetVLAD)
    fresh = NetVLAD(NetVLADConfig(head.config.num_channels, head.config.num_clusters, head.config.out_dim))
    assert not torch.allclose(head.centroids, fresh.centroids)
    norms = head.centroids.norm(dim=1)  # k-means means of L2-normalised tokens: inside the unit ball
    assert bool(((norms > 0.05) & (norms <= 1.0 + 1e-5)).all())
    result = trainer.fit()
    assert 0.0 <= result["metrics"]["R@1"] <= 1.0
