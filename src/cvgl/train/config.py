"""Typed training configuration, read from YAML and saved (resolved) next to every run.

Why dataclasses and a strict reader instead of a dict: a typo in a YAML key (``lr`` for
``learning_rate``) must stop the run with a message naming the file and the key, not silently
train with a default. Every field has the GenGeo paper's value as its default where the paper
gives one (AdamW 1e-4, cosine, M=64, l=128, 1024-d, last 4 blocks, k=64 of K=128, e=4).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cvgl.errors import InputError
from cvgl.io import write_text_atomic
from cvgl.models.presets import FINETUNE_MODES, HEAD_KINDS


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


@dataclass
class DataConfig:
    """Where pairs come from. ``kind`` picks a loader of :mod:`cvgl.data.datasets`."""

    kind: str = "ortho-pairs"  # cvusa | cvact | vigor | university1652 | pairs-csv | ortho-pairs
    root: str = ""  # dataset root (or the pairs CSV for pairs-csv)
    test_root: str = ""  # pairs-csv: a second CSV for evaluation (optional)
    options: dict = field(default_factory=dict)  # extra loader keywords (e.g. VIGOR same_area, U1652 direction)
    # ortho-pairs: two co-registered orthophotos of one area; "longmont" uses the embedded scenes.
    query_raster: str = "longmont:wv2"
    reference_raster: str = "longmont:wv3"
    train_pairs: int = 256
    train_x_range: tuple[float, float] = (0.0, 0.5)  # fraction of the scene's width (west half)
    test_pairs: int = 128  # eval.protocol "split" on ortho pairs: pairs cut from the test strip
    test_x_range: tuple[float, float] = (0.5, 1.0)
    augment: bool = True
    num_workers: int = 0


@dataclass
class OptimConfig:
    epochs: int = 80
    batch_size: int = 32  # per process; the global batch is batch_size x world size
    learning_rate: float = 1e-4
    head_lr_scale: float = 1.0  # head (and temperature) lr = learning_rate x this; 1 = the paper
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    bf16: bool = False  # autocast to bfloat16 (worth it on GPUs/AMX CPUs; off by default on CPU)
    temperature: float = 0.07
    label_smoothing: float = 0.1


@dataclass
class SamplingConfig:
    """Sample4Geo's two stages: GPS neighbours, then Dynamic Similarity Sampling every ``dss_every`` epochs."""

    gps: bool = True
    gps_neighbours: int = 8  # neighbours put beside each anchor in a batch
    dss_start_epoch: int = 4  # first epoch (0-based) sampled by descriptor similarity; -1 = never
    dss_every: int = 4  # e
    dss_k: int = 64  # k: half nearest, half random from the K nearest
    dss_K: int = 128  # K


@dataclass
class EvalConfig:
    every_epochs: int = 1
    protocol: str = "split"  # split (the dataset's test split) | longmont (east-half drone protocol)
    per_family: int = 50  # longmont: photos per family
    families: list[str] = field(default_factory=list)  # longmont: subset of family names; [] = all six


@dataclass
class TrainConfig:
    name: str = "gengeo"
    seed: int = 0
    out_dir: str = "runs/gengeo"
    threads: int | None = None
    log_every_steps: int = 10
    checkpoint_every_steps: int | None = None  # also at every epoch end
    tensorboard: bool = True  # when the tensorboard package is installed
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return plain_dict(self)


def plain_dict(config) -> dict:
    """A config dataclass as JSON/YAML-ready nested dicts and lists (tuples become lists)."""
    return _plain(dataclasses.asdict(config))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _convert(cls, data, where: str):
    """Build dataclass ``cls`` from ``data``, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(hint, value, where: str):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _convert(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise InputError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if origin is list:
        if not isinstance(value, list):
            raise InputError(f"{where}: expected a list, got {value!r}")
        (arg,) = typing.get_args(hint)
        return [_coerce(arg, v, where) for v in value]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: expected a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise InputError(f"{where}: expected text, got {value!r}")
        return value
    return value


CHOICES = {
    "model.finetune": FINETUNE_MODES,
    "model.head": HEAD_KINDS,
    "data.kind": ("cvusa", "cvact", "vigor", "university1652", "pairs-csv", "ortho-pairs"),
    "eval.protocol": ("split", "longmont"),
}


def validate(config: TrainConfig, where: str) -> TrainConfig:
    """Check choices and ranges that types alone do not catch."""
    plain = config.to_dict()
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        if plain[section][key] not in allowed:
            raise InputError(f"{where}: {dotted} is '{plain[section][key]}'; choose one of {', '.join(allowed)}")
    for name in ("query_size", "reference_size"):
        size = getattr(config.model, name)
        if any(v <= 0 or v % 14 for v in size):
            raise InputError(f"{where}: model.{name} {list(size)} must be positive multiples of 14")
    if config.optim.epochs < 1 or config.optim.batch_size < 2:
        raise InputError(f"{where}: optim.epochs must be >= 1 and optim.batch_size >= 2 (InfoNCE needs negatives)")
    if not 0 < config.sampling.dss_k <= config.sampling.dss_K:
        raise InputError(f"{where}: sampling.dss_k must be in (0, dss_K]")
    return config


def load_config(path: Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config; ``overrides`` are ``section.key=value`` strings (YAML values)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise InputError(f"{path}: cannot read the config ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    for item in overrides or []:
        if "=" not in item:
            raise InputError(f"override '{item}' is not section.key=value")
        dotted, text = item.split("=", 1)
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(text)
    return validate(_convert(TrainConfig, data, str(path)), str(path))


def save_config(config: TrainConfig, path: Path) -> Path:
    return write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def config_from_dict(data: dict, where: str = "config") -> TrainConfig:
    return validate(_convert(TrainConfig, data, where), where)


def model_config_from_dict(data: dict, where: str = "model config") -> ModelConfig:
    """The ``model`` section alone (as stored in a trained export), typed like a YAML file's."""
    return _convert(ModelConfig, data, where)
