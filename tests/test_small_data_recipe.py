"""The small-data GenGeo recipe: a residual head that starts as the zero-shot descriptor, a head
reading an inner block, SALAD started from PCA + k-means of tokens (tiny random-weight ViT)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cvgl.errors import InputError
from cvgl.models.backbone import LayerTokens
from cvgl.models.gengeo import export_trained, load_trained
from cvgl.models.heads import gem
from cvgl.models.presets import ModelConfig
from cvgl.models.residual_head import ResidualHead
from cvgl.models.salad import Salad
from cvgl.models.view_heads import HeadSpec, build_head, head_from_description
from cvgl.train.head_init import init_salad_from_tokens
from cvgl.train.model import build_model
from cvgl.train.policy import set_trainable

TINY = "random:dinov2_tiny_test"  # 2 blocks, 32 channels
SMALL_SALAD = {"num_clusters": 4, "cluster_dim": 3, "token_dim": 2, "dropout": 0.0}


def images(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def residual_model(block: int = 1):
    config = ModelConfig(weights=TINY, block=block, residual=True, last_n=1, out_dim=48,
                         query_size=(56, 56), reference_size=(56, 56), **SMALL_SALAD)
    model, _ = build_model(config, seed=0)
    return model.eval(), config


def zero_shot_gem(model, x: torch.Tensor, block: int) -> torch.Tensor:
    """The plain reference: GeM p=3 over the block's raw patch tokens, as gem-lN-raw pools them."""
    normalised = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    raw = model.backbone.forward_layers(normalised, [block], norm=False)[block]
    return F.normalize(gem(raw.patches, 3.0), dim=1)


def test_residual_head_starts_as_the_zero_shot_descriptor_of_its_block():
    model, _ = residual_model(block=1)
    x = images()
    with torch.no_grad():
        trained = model.encode(x, "query")
        reference = zero_shot_gem(model, x, 1)
    assert trained.shape == (5, 48)
    torch.testing.assert_close(trained[:, :32], reference)  # identity-padded embedding
    assert trained[:, 32:].abs().max() == 0
    torch.testing.assert_close(trained @ trained.T, reference @ reference.T)  # the ranking is the zero-shot one


def test_the_correction_learns_from_the_first_step_and_the_base_after_it():
    model, _ = residual_model()
    head = model.heads.query
    model.train()
    q, r = model(images(4, 1), images(4, 2))
    (q * r).sum().backward()
    assert head.correction.weight.grad.abs().sum() > 0  # zero weights, non-zero gradient
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in head.base.parameters())
    with torch.no_grad():
        head.correction.weight.add_(0.01)
    model.zero_grad()
    q, r = model(images(4, 1), images(4, 2))
    (q * r).sum().backward()
    assert head.base.features[0].weight.grad.abs().sum() > 0


def test_a_head_on_block_1_does_not_run_or_train_later_blocks():
    model, _ = residual_model(block=1)
    trainable = {name for name, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("blocks.0.") for name in trainable)  # no final norm: raw tokens
    calls = []
    hook = model.backbone.blocks[1].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model.encode(images(2), "reference")
    hook.remove()
    assert calls == []


def test_set_trainable_counts_last_n_back_from_the_block_and_refuses_blocks_out_of_range():
    model, _ = residual_model()
    backbone = model.backbone
    set_trainable(backbone, "full", block=1, final_norm=False)
    assert not any(p.requires_grad for p in backbone.blocks[1].parameters())
    assert all(p.requires_grad for p in backbone.blocks[0].parameters())
    with pytest.raises(InputError, match="model.block 3"):
        set_trainable(backbone, "last_n", 1, block=3)
    with pytest.raises(InputError, match="up to block 1"):
        set_trainable(backbone, "last_n", 2, block=1)


def test_residual_heads_round_trip_through_description_and_export(tmp_path):
    spec = HeadSpec(residual=True, out_dim=40, **SMALL_SALAD)
    head = build_head(spec, 32)
    assert isinstance(head, ResidualHead) and isinstance(head.base, Salad) and head.out_dim == 40
    rebuilt = head_from_description(head.describe())
    assert rebuilt.describe() == head.describe()
    with pytest.raises(ValueError, match="out_dim >= 32"):
        build_head(HeadSpec(residual=True, out_dim=16, **SMALL_SALAD), 32)
    model, _ = residual_model()
    with torch.no_grad():
        model.heads.query.correction.weight.normal_()
        before = model.encode(images(3), "reference")
    path = export_trained(model, tmp_path / "m.safetensors", "small")
    loaded, _, _ = load_trained(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(images(3), "reference"), before)


def _clustered_tokens(seed: int = 0) -> tuple[LayerTokens, torch.Tensor]:
    """Tokens around 4 well-separated centres in a 6-d subspace of 32 channels (plus small noise)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.zeros(4, 32)
    centres[:, :4] = 10.0 * torch.eye(4)
    labels = torch.randint(4, (3 * 7 * 7,), generator=g)
    rows = centres[labels] + 0.05 * torch.randn(len(labels), 32, generator=g)
    patches = rows.reshape(3, 7, 7, 32).permute(0, 3, 1, 2)
    return LayerTokens(cls=torch.randn(3, 32, generator=g), patches=patches), labels


def test_salad_token_init_gives_pca_features_and_centroid_scores():
    tokens, labels = _clustered_tokens()
    salad = build_head(HeadSpec(out_dim=None, **SMALL_SALAD), 32).eval()
    init_salad_from_tokens(salad, tokens, seed=0)
    rows = tokens.patches.permute(0, 2, 3, 1).reshape(-1, 32).double()
    centred = rows - rows.mean(0)
    with torch.no_grad():
        features = salad.features(tokens.patches).flatten(2).permute(0, 2, 1).reshape(-1, 3).double()
        scores = salad.score(tokens.patches).flatten(2).permute(0, 2, 1).reshape(-1, 4)
    # The feature branch is the projection on the top principal directions (up to sign): the same Gram matrix.
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    pca = centred @ v[:3].T
    torch.testing.assert_close(features @ features.T, pca @ pca.T, rtol=1e-3, atol=1e-2)
    # The score branch sends each token to its own cluster: the argmax partitions tokens as the labels do.
    assigned = scores.argmax(1)
    for cluster in range(4):
        members = labels[assigned == cluster]
        assert len(members) and (members == members[0]).all()


def test_token_init_refuses_more_feature_dimensions_than_components():
    tokens, _ = _clustered_tokens()
    salad = build_head(HeadSpec(out_dim=None, num_clusters=4, cluster_dim=300, token_dim=2, dropout=0.0), 32)
    with pytest.raises(ValueError, match="cluster_dim <= 32"):
        init_salad_from_tokens(salad, tokens)


# ------------------------------------------------------------------ the region workflow (cvgl train --region)


def _split(name: str, n_q: int, n_r: int, view: str = "drone"):
    from pathlib import Path

    from cvgl.data.datasets.common import CrossViewSplit, ViewItem

    queries = [ViewItem(Path(f"{name}/q{i}.png"), 40.0, -105.0, i % n_r) for i in range(n_q)]
    references = [ViewItem(Path(f"{name}/r{i}.png"), 40.0, -105.0, i) for i in range(n_r)]
    return CrossViewSplit(name, view, "satellite", queries, references, [[i % n_r] for i in range(n_q)])


def test_joined_splits_keep_each_pair_and_never_share_a_reference_or_location():
    from cvgl.data.datasets.common import CrossViewSplit

    a, b = _split("a", 3, 2), _split("b", 2, 2)
    joined = CrossViewSplit.concat([a, b], "ab")
    assert len(joined.queries) == 5 and len(joined.references) == 4
    for q, r in joined.pairs():  # every query still points at its own tile
        assert joined.queries[q].path.stem[1:] and joined.references[r].path.parent == joined.queries[q].path.parent
    locations = joined.pair_locations()
    assert set(locations[:3]).isdisjoint(locations[3:])
    assert {item.location for item in joined.references[:2]}.isdisjoint({item.location for item in joined.references[2:]})
    with pytest.raises(ValueError, match="different views"):
        CrossViewSplit.concat([a, _split("c", 1, 1, view="street")], "ac")


def test_rasters_mean_every_ordered_pair_and_bad_ones_stop_before_the_model(tmp_path):
    from cvgl.train.config import DataConfig, TrainConfig, config_from_dict
    from cvgl.train.data import ortho_directions

    assert ortho_directions(DataConfig()) == [("longmont:wv2", "longmont:wv3")]
    three = DataConfig(rasters=["a", "b", "c"])
    assert ortho_directions(three) == [("a", "b"), ("a", "c"), ("b", "a"), ("b", "c"), ("c", "a"), ("c", "b")]
    base = TrainConfig().to_dict()
    for rasters, message in ((["longmont:wv2"], "two or more"), (["longmont:wv2", "longmont:wv2"], "two or more"),
                             (["longmont:wv2", str(tmp_path / "missing.tif")], "missing.tif: orthophoto not found")):
        with pytest.raises(InputError, match=message):
            config_from_dict({**base, "data": {**base["data"], "rasters": rasters}})
    with pytest.raises(InputError, match="nope.csv: pairs CSV not found"):
        config_from_dict({**base, "data": {**base["data"], "extra_pairs": str(tmp_path / "nope.csv")}})


@pytest.mark.real
def test_cvgl_train_region_cuts_both_directions_adds_own_pairs_and_logs_the_zero_shot_start(tmp_path):
    """The user workflow end to end on the embedded WV2 + WV3 scenes (tiny random ViT, a few pairs)."""
    import json

    from test_trainer import write_pairs

    from cvgl.cli import main
    from cvgl.data.samples import longmont_scene

    own = write_pairs(tmp_path / "own", n=4)
    out = tmp_path / "run"
    tiny = ["model.weights=random:dinov2_tiny_test", "model.block=2", "model.last_n=1", "model.num_clusters=4",
            "model.cluster_dim=8", "model.token_dim=8", "model.out_dim=40", "model.query_size=[56, 56]",
            "model.reference_size=[56, 56]", "data.train_pairs=8", "data.test_pairs=4", "optim.epochs=1",
            "optim.batch_size=4", "sampling.gps_neighbours=1", "sampling.dss_start_epoch=-1", "sampling.dss_k=4",
            "sampling.dss_K=8", "threads=1"]
    argv = ["train", "--region", longmont_scene("wv2"), longmont_scene("wv3"), "--extra-pairs", str(own), "--out", str(out)]
    for item in tiny:
        argv += ["--set", item]
    assert main([str(a) for a in argv]) == 0
    train = out / "pairs" / "train"
    assert sorted(p.name for p in train.iterdir()) == ["0", "1"]  # WV2 -> WV3 and WV3 -> WV2, 4 pairs each
    assert all(len((train / d / "pairs.csv").read_text().splitlines()) == 5 for d in ("0", "1"))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if r.get("event") == "eval"]
    assert [e["step"] for e in evals] == [0, 3]  # before the first step (zero-shot) and after epoch 1: 12 pairs / 4
    assert (out / "model.safetensors").is_file()


# ------------------------------------------------------------------ the paper's own configuration stays runnable


@pytest.mark.parametrize("name, kind", [("cvusa", "cvusa"), ("cvact", "cvact"), ("vigor-same", "vigor"), ("vigor-cross", "vigor")])
def test_paper_configs_have_the_papers_settings_and_train_on_their_layout(tmp_path, name, kind):
    """configs/paper/*.yaml hold Sec. 4.2's values; with a tiny model and a fixture tree one step runs."""
    from pathlib import Path

    import data.make_fixtures as fixtures

    from cvgl.train.config import load_config
    from cvgl.train.trainer import Trainer

    path = Path(__file__).parents[1] / "configs" / "paper" / f"{name}.yaml"
    paper = load_config(path)
    m, o, s = paper.model, paper.optim, paper.sampling
    assert (m.weights, m.finetune, m.last_n, m.head, m.num_clusters, m.cluster_dim, m.out_dim) == (
        "hub:dinov2_vitb14", "last_n", 4, "salad", 64, 128, 1024)
    assert m.shared_head and m.dustbin and m.block == -1 and not m.residual
    assert (o.epochs, o.batch_size * 8, o.learning_rate) == (80, 256, 1e-4)
    assert (s.dss_k, s.dss_K, s.dss_every) == (64, 128, 4)
    assert (m.query_size, m.reference_size) == (((154, 770), (392, 392)) if kind != "vigor" else ((294, 588), (294, 294)))
    root = tmp_path / kind
    getattr(fixtures, f"make_{kind}")(root)
    tiny = [f"data.root={root}", "data.num_workers=0", "model.weights=random:dinov2_tiny_test", "model.query_size=[28, 56]",
            "model.reference_size=[28, 28]", "model.num_clusters=4", "model.cluster_dim=8", "model.token_dim=8",
            "model.out_dim=16", "model.last_n=1", "optim.batch_size=2", "optim.epochs=1", "sampling.gps_neighbours=1",
            "sampling.dss_k=2", "sampling.dss_K=4", "threads=1", "tensorboard=false"]
    trainer = Trainer(load_config(path, tiny), tmp_path / "run")
    trainer.fit(stop_after_steps=1)
    assert trainer.state.step == 1


# ------------------------------------------------------------------ wrong-heading negatives (data.wrong_headings)


def test_wrong_turns_are_distinct_wrong_steps_fixed_by_the_file_name():
    from pathlib import Path

    from cvgl.train.data import wrong_turns

    turns = wrong_turns(Path("a/00017.jpg"), 5, 16)
    assert turns == wrong_turns(Path("b/00017.jpg"), 5, 16) and len(set(turns)) == 5
    assert all(1 <= k <= 15 for k in turns)
    assert wrong_turns(Path("x.jpg"), 15, 16) == list(range(1, 16)) and wrong_turns(Path("x.jpg"), 0, 16) == []
    with pytest.raises(InputError, match="wrong_headings 16"):
        wrong_turns(Path("x.jpg"), 16, 16)


@pytest.mark.real
def test_wrong_headings_are_locates_own_hypotheses_and_reach_the_batch_augmented_like_the_query(tmp_path):
    """Real WV2 photos: each turned image is what prepare_query makes at that wrong heading."""
    import numpy as np

    from cvgl.data.augment import PairedAugment
    from cvgl.data.datasets.common import PairDataset, load_resized
    from cvgl.data.datasets.ortho_pairs import cut_ortho_pairs
    from cvgl.data.datasets.pairs_csv import load_pairs_csv
    from cvgl.data.images import load_image
    from cvgl.data.samples import longmont_scene
    from cvgl.preprocess import QueryOptions, prepare_query
    from cvgl.train.data import prepare_queries, prepared_split, wrong_turns

    csv = cut_ortho_pairs(longmont_scene("wv2"), longmont_scene("wv3"), tmp_path / "pairs", count=2, seed=3, x_range=(0.0, 0.5))
    raw = load_pairs_csv(csv, query_view="drone", reference_view="satellite")
    photos = [item.path for item in raw.queries]
    prepare_queries(raw, tmp_path / "prepared", tile_m=112.0, gsd_m=0.5, wrong_headings=2)
    split = prepared_split(raw, tmp_path / "prepared", 2)
    for photo, item in zip(photos, split.queries, strict=True):
        heading = prepare_query(photo, QueryOptions(), 112.0, 0.5).match_view.heading_deg
        assert heading is not None and len(item.wrong_headings) == 2
        for k, path in zip(wrong_turns(photo, 2, 16), item.wrong_headings, strict=True):
            expected = prepare_query(photo, QueryOptions(heading_deg=(heading + 22.5 * k) % 360), 112.0, 0.5).hypotheses[0].image
            assert np.array_equal(load_image(path), expected)
        assert not np.array_equal(load_image(item.wrong_headings[0]), load_image(item.path))
    augment = PairedAugment("aerial", seed=5, query_rotation_deg=11.25)
    dataset = PairDataset(split, (56, 56), (56, 56), augment, wrong_headings=True)
    dataset.set_epoch(1)  # epoch 1 takes each photo's second wrong heading
    sample = dataset[0]
    q, r = split.pairs()[0]
    turned = load_resized(split.queries[q].wrong_headings[1], (56, 56))
    expected, _ = augment(turned, load_resized(split.references[r].path, (56, 56)), epoch=1, index=0)
    assert torch.equal(sample["query_wrong"], expected)
    with pytest.raises(ValueError, match="no wrong-heading images"):
        PairDataset(raw.__class__(raw.name, raw.query_view, raw.reference_view,
                                  [item.__class__(item.path, item.lat, item.lon, item.location) for item in split.queries],
                                  split.references, split.positives), (56, 56), (56, 56), wrong_headings=True)


def test_wrong_headings_are_refused_where_no_heading_is_prepared(tmp_path):
    from cvgl.train.config import TrainConfig, config_from_dict

    base = TrainConfig().to_dict()
    own = tmp_path / "own.csv"
    own.write_text("query,reference\n")
    for data, message in (({"wrong_headings": 16}, "must be in"), ({"wrong_headings": 2, "extra_pairs": str(own)}, "extra pairs"),
                          ({"wrong_headings": 2, "kind": "cvusa", "root": str(tmp_path)}, "for ortho-pairs")):
        with pytest.raises(InputError, match=message):
            config_from_dict({**base, "data": {**base["data"], **data}})
