"""Typed training configuration, read from YAML and saved (resolved) next to every run.

Why dataclasses and a strict reader instead of a dict: a typo in a YAML key (``lr`` for
``learning_rate``) must stop the run with a message naming the file and the key, not silently
train with a default. Every field has the GenGeo paper's value as its default where the paper
gives one (AdamW 1e-4, cosine, M=64, l=128, 1024-d, last 4 blocks, k=64 of K=128, e=4).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cvgl.errors import InputError
from cvgl.io import write_text_atomic
from cvgl.models.presets import FINETUNE_MODES, HEAD_INITS, HEAD_KINDS, ModelConfig
from cvgl.typed import from_dict, plain_dict


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
    # ortho-pairs with two or more orthophotos (dates, sensors): pairs from every ordered pair of them
    # (photo cut from one, tile from another: both directions of each date pair), train_pairs shared
    # out evenly; the test pairs keep the first direction. Empty: query_raster -> reference_raster only.
    rasters: list[str] = field(default_factory=list)
    extra_pairs: str = ""  # ortho-pairs: a pairs CSV of your own photo/tile pairs, added to the training pairs
    train_pairs: int = 256
    train_x_range: tuple[float, float] = (0.0, 0.5)  # fraction of the scene's width (west half)
    test_pairs: int = 128  # eval.protocol "split" on ortho pairs: pairs cut from the test strip
    test_x_range: tuple[float, float] = (0.5, 1.0)
    augment: bool = True
    query_rotation_deg: float = 0.0  # aerial pairs: turn the query alone by up to +-this (heading-unknown photos)
    # ortho-pairs: also prepare each training photo at this many of its wrong headings (of locate's 16);
    # each step scores one of them against every other tile as a negative (SymmetricInfoNCE ``wrong``).
    wrong_headings: int = 0
    num_workers: int = 0
    pairs_dir: str = ""  # ortho-pairs: where the pairs are cut (default: RUN/pairs); runs of one ablation share it


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
    at_start: bool = False  # also evaluate before the first step of a new run (step 0 of the learning curve)
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


# The small-data recipe (cvgl train --region): package data, so it works from an installed wheel.
SMALL_DATA_RECIPE = Path(__file__).with_name("recipes") / "small-data.yaml"

CHOICES = {
    "model.finetune": FINETUNE_MODES,
    "model.head": HEAD_KINDS,
    "model.head_init": HEAD_INITS,
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
    positive = {
        "optim.learning_rate": config.optim.learning_rate, "optim.temperature": config.optim.temperature,
        "eval.every_epochs": config.eval.every_epochs, "log_every_steps": config.log_every_steps,
        "sampling.dss_every": config.sampling.dss_every, "sampling.gps_neighbours": config.sampling.gps_neighbours + 1,
        "data.train_pairs": config.data.train_pairs, "data.test_pairs": config.data.test_pairs,
    }
    if config.threads is not None:
        positive["threads"] = config.threads
    if config.checkpoint_every_steps is not None:
        positive["checkpoint_every_steps"] = config.checkpoint_every_steps
    if config.optim.grad_clip is not None:
        positive["optim.grad_clip"] = config.optim.grad_clip
    for dotted, value in positive.items():
        if not value > 0:
            shown = value - 1 if dotted == "sampling.gps_neighbours" else value
            raise InputError(f"{where}: {dotted} is {shown}; it must be {'at least 0' if dotted == 'sampling.gps_neighbours' else 'positive'}")
    for dotted, value, low, high in (
        ("optim.weight_decay", config.optim.weight_decay, 0.0, 10.0), ("optim.label_smoothing", config.optim.label_smoothing, 0.0, 1.0),
        ("optim.min_lr_ratio", config.optim.min_lr_ratio, 0.0, 1.0), ("optim.warmup_epochs", config.optim.warmup_epochs, 0.0, float(config.optim.epochs)),
        ("optim.head_lr_scale", config.optim.head_lr_scale, 0.0, 1e6), ("data.num_workers", config.data.num_workers, 0, 256),
    ):
        if not low <= value <= high:
            raise InputError(f"{where}: {dotted} is {value}; it must be in [{low:g}, {high:g}]")
    model = config.model
    for dotted, value in (("model.num_clusters", model.num_clusters), ("model.cluster_dim", model.cluster_dim),
                          ("model.token_dim", model.token_dim), ("model.out_dim", model.out_dim or 1), ("model.last_n", model.last_n + 1)):
        if value < 1:
            raise InputError(f"{where}: {dotted} must be {'at least 0' if dotted == 'model.last_n' else 'positive'}")
    if not 0.0 <= model.dropout < 1.0:
        raise InputError(f"{where}: model.dropout is {model.dropout}; it must be in [0, 1)")
    for name in ("train_x_range", "test_x_range"):
        low, high = getattr(config.data, name)
        if not 0.0 <= low < high <= 1.0:
            raise InputError(f"{where}: data.{name} {[low, high]} must be 0 <= low < high <= 1 (fractions of the scene's width)")
    _check_loader_options(config.data, where)
    _check_ortho_inputs(config.data, where)
    return config


def check_rasters(data: DataConfig, where: str) -> None:
    """``data.rasters`` is empty (one direction) or names two or more different orthophotos."""
    if data.rasters and (len(data.rasters) < 2 or len(set(data.rasters)) != len(data.rasters)):
        raise InputError(f"{where}: data.rasters needs two or more different orthophotos of one area (got {len(data.rasters)})")


def _check_ortho_inputs(data: DataConfig, where: str) -> None:
    """Orthophotos and extra pairs are checked here, before a model is built (which takes seconds)."""
    if data.kind != "ortho-pairs":
        if data.wrong_headings:
            raise InputError(f"{where}: data.wrong_headings is for ortho-pairs (photos cut with a known heading), not {data.kind}")
        return
    check_rasters(data, where)
    named = [*(data.rasters or [data.query_raster, data.reference_raster])]
    for text in named:
        if not text.startswith("longmont:") and not Path(text).is_file():
            raise InputError(f"{text}: orthophoto not found (data.rasters / data.query_raster / data.reference_raster in {where})")
    if data.extra_pairs and not Path(data.extra_pairs).is_file():
        raise InputError(f"{data.extra_pairs}: pairs CSV not found (data.extra_pairs / --extra-pairs)")
    if data.wrong_headings:
        from cvgl.preprocess import QueryOptions  # the heading grid locate searches (one home for its size)

        rotations = QueryOptions().rotations
        if not 0 < data.wrong_headings < rotations:
            raise InputError(f"{where}: data.wrong_headings {data.wrong_headings} must be in [0, {rotations - 1}] "
                             f"(locate tries {rotations} headings)")
    if data.wrong_headings and data.extra_pairs:
        raise InputError(f"{where}: data.wrong_headings needs every training photo's heading; the extra pairs "
                         f"({data.extra_pairs}) have none prepared; drop one of the two")


def _check_loader_options(data: DataConfig, where: str) -> None:
    """``data.options`` are keywords of the dataset loader: an unknown one stops here, not after
    the model is built (a TypeError traceback from deep inside the data pipeline)."""
    if not data.options:
        return
    from cvgl.data import datasets

    loaders = {"cvusa": datasets.load_cvusa, "cvact": datasets.load_cvact, "vigor": datasets.load_vigor,
               "university1652": datasets.load_university1652, "pairs-csv": datasets.load_pairs_csv}
    loader = loaders.get(data.kind)
    allowed = [] if loader is None else [
        name for name, p in inspect.signature(loader).parameters.items()
        if name not in ("root", "path", "split") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    unknown = sorted(set(data.options) - set(allowed))
    if unknown:
        known = ", ".join(allowed) if allowed else f"none: data.kind {data.kind} takes no options"
        raise InputError(f"{where}: data.options has unknown key '{unknown[0]}' for data.kind {data.kind} (known: {known})")


def load_config(path: Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config; ``overrides`` are ``section.key=value`` strings (YAML values)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise InputError(f"{path}: cannot read the config ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: the config is a YAML {type(data).__name__}, not a mapping of sections")
    for item in overrides or []:
        apply_override(data, item)
    return validate(from_dict(TrainConfig, data, str(path)), str(path))


def apply_override(data: dict, item: str) -> None:
    """One ``--set section.key=value`` (the value in YAML) applied to the raw config mapping.

    Every part of the key must name a field of the config (``optim.lr`` is refused with the known
    keys, not added and then reported against the file), and the value must be valid YAML."""
    dotted, sep, text = item.partition("=")
    parts = dotted.strip().split(".")
    if not sep or not all(parts):
        raise InputError(f"--set '{item}': expected section.key=value, e.g. optim.epochs=10")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"--set '{item}': the value is not valid YAML ({str(exc).splitlines()[0]})") from None
    record: type | None = TrainConfig
    node = data
    for depth, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(record)} if record is not None else {}
        if record is not None and part not in names:
            where = ".".join(parts[:depth]) or "the config"
            raise InputError(f"--set '{item}': {where} has no key '{part}' (known: {', '.join(sorted(names))})")
        if depth == len(parts) - 1:
            node[part] = value
            return
        hint = typing.get_type_hints(record).get(part) if record is not None else None
        if hint is dict or typing.get_origin(hint) is dict:  # a free mapping (data.options): keys checked later
            hint = None
        elif record is None or not dataclasses.is_dataclass(hint):
            raise InputError(f"--set '{item}': {'.'.join(parts[: depth + 1])} is a value, not a section with keys")
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise InputError(f"--set '{item}': {'.'.join(parts[: depth + 1])} is not a section in the config file")
        node, record = child, hint


def save_config(config: TrainConfig, path: Path) -> Path:
    return write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def config_from_dict(data: dict, where: str = "config") -> TrainConfig:
    return validate(from_dict(TrainConfig, data, where), where)
