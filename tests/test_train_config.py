"""Typed YAML training configs: defaults follow the paper, typos and bad values fail in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvgl.errors import InputError
from cvgl.train.config import TrainConfig, config_from_dict, load_config, save_config
from cvgl.train.optim import cosine_with_warmup

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_papers():
    config = TrainConfig()
    assert (config.model.num_clusters, config.model.cluster_dim, config.model.out_dim) == (64, 128, 1024)
    assert (config.model.finetune, config.model.last_n, config.model.head, config.model.dustbin) == ("last_n", 4, "salad", True)
    assert config.optim.learning_rate == 1e-4
    assert (config.sampling.dss_k, config.sampling.dss_K, config.sampling.dss_every) == (64, 128, 4)


def test_round_trip(tmp_path):
    config = config_from_dict({"name": "x", "model": {"head": "netvlad", "query_size": [154, 770]}, "optim": {"epochs": 3}})
    save_config(config, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == config
    assert again.model.query_size == (154, 770)


def test_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  epochs: 2\n")
    config = load_config(path, ["optim.learning_rate=0.001", "model.dustbin=false", "data.train_x_range=[0.0, 0.25]"])
    assert config.optim.learning_rate == 0.001 and config.model.dustbin is False
    assert config.data.train_x_range == (0.0, 0.25)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("optim:\n  lr: 0.1\n", "unknown key 'lr'"),
        ("model:\n  head: transformer\n", "model.head is 'transformer'"),
        ("model:\n  query_size: [100, 100]\n", "multiples of 14"),
        ("optim:\n  epochs: two\n", "optim.epochs: expected a whole number"),
        ("model:\n  dustbin: 1\n", "expected true or false"),
        ("optim:\n  batch_size: 1\n", "batch_size >= 2"),
        ("model: [1, 2]\n", "expected a mapping"),
        ("model: {head: salad\n", "not valid YAML"),
    ],
)
def test_bad_configs_name_the_file_and_key(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        load_config(path)
    message = str(info.value)
    assert needle in message and str(path) in message and "\n" not in message


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    files = sorted(CONFIGS.rglob("*.yaml"))
    assert files, "configs/ should ship the ablation configs"
    for path in files:
        load_config(path)


def test_cosine_with_warmup_shape():
    total, warmup = 100, 10
    factors = [cosine_with_warmup(s, total, warmup) for s in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] < 0.01
    assert cosine_with_warmup(5, 10, 0, min_ratio=0.5) >= 0.5
