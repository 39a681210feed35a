"""Trainable heads behind one spec, per-view heads, descriptions, and backbone fine-tuning modes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cvgl.errors import InputError
from cvgl.models.backbone import LayerTokens
from cvgl.models.factory import load_backbone
from cvgl.models.netvlad import NetVLAD
from cvgl.models.salad import Salad
from cvgl.models.view_heads import (
    ClsHead,
    HeadSpec,
    ViewHeads,
    build_head,
    head_from_description,
)
from cvgl.train.policy import set_trainable

SMALL = {"num_clusters": 4, "cluster_dim": 3, "token_dim": 2, "out_dim": 5, "dropout": 0.0}


def tokens(batch: int = 2, channels: int = 8, h: int = 3, w: int = 3, seed: int = 0) -> LayerTokens:
    g = torch.Generator().manual_seed(seed)
    return LayerTokens(cls=torch.randn(batch, channels, generator=g), patches=torch.randn(batch, channels, h, w, generator=g))


def test_cls_head_is_the_normalised_cls_token_or_its_projection():
    t = tokens()
    assert torch.allclose(ClsHead(8)(t), F.normalize(t.cls, dim=1))
    head = ClsHead(8, out_dim=3)
    out = head(t)
    assert out.shape == (2, 3) and head.out_dim == 3
    expected = F.normalize(head.projection(F.normalize(t.cls, dim=1)), dim=1)
    assert torch.allclose(out, expected) and torch.allclose(out.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("kind,cls", [("salad", Salad), ("netvlad", NetVLAD), ("cls", ClsHead)])
def test_build_head_and_rebuild_it_from_its_json_description(kind, cls):
    torch.manual_seed(0)
    head = build_head(HeadSpec(kind=kind, **SMALL), num_channels=8).eval()
    assert isinstance(head, cls)
    description = json.loads(json.dumps(head.describe()))
    assert description["kind"] == kind
    rebuilt = head_from_description(description).eval()
    rebuilt.load_state_dict(head.state_dict(), strict=True)  # same architecture, same shapes
    t = tokens()
    with torch.no_grad():
        out = head(t)
    assert out.shape == (2, head.out_dim) == (2, 5)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    with torch.no_grad():
        assert torch.equal(rebuilt(t), out)


def test_spec_fields_reach_the_head():
    head = build_head(HeadSpec(kind="salad", num_clusters=7, cluster_dim=2, token_dim=3, dustbin=False, out_dim=None), 8)
    assert head.config.num_clusters == 7 and head.dustbin is None and head.out_dim == 7 * 2 + 3
    vlad = build_head(HeadSpec(kind="netvlad", num_clusters=3, out_dim=None, concat_cls=True), 8)
    assert vlad.out_dim == 3 * 8 + 8


def test_unknown_kinds_and_bad_descriptions_are_one_line_errors():
    with pytest.raises(InputError, match="unknown head kind 'gem'"):
        build_head(HeadSpec(kind="gem"), 8)
    with pytest.raises(InputError, match="unknown head kind"):
        head_from_description({"kind": "mystery"})
    with pytest.raises(InputError, match="does not fit"):
        head_from_description({"kind": "salad", "num_channels": 8, "colour": "blue"})


def test_shared_view_heads_use_one_head_for_both_views():
    torch.manual_seed(0)
    heads = ViewHeads.build(HeadSpec(**SMALL), num_channels=8).eval()
    t = tokens()
    assert heads.shared and heads.out_dim == 5
    with torch.no_grad():
        assert torch.equal(heads(t, "query"), heads(t, "reference"))
    assert len(list(heads.parameters())) == len(list(heads.query.parameters()))


def test_separate_view_heads_differ_and_round_trip_through_their_description():
    torch.manual_seed(0)
    heads = ViewHeads.build(HeadSpec(shared=False, **SMALL), num_channels=8).eval()
    t = tokens()
    assert not heads.shared
    with torch.no_grad():
        assert not torch.allclose(heads(t, "query"), heads(t, "reference"))
    assert len(list(heads.parameters())) == 2 * len(list(heads.query.parameters()))
    rebuilt = ViewHeads.from_description(json.loads(json.dumps(heads.describe()))).eval()
    rebuilt.load_state_dict(heads.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(t, "reference"), heads(t, "reference"))
    with pytest.raises(ValueError, match="unknown view"):
        heads(t, "aerial")


# ------------------------------------------------------------------------------ fine-tuning modes


@pytest.fixture(scope="module")
def tiny_backbone():
    backbone, _, _ = load_backbone("random:dinov2_tiny_test", seed=0)
    return backbone


def backward_through(backbone, head) -> None:
    """One forward/backward of a tiny batch through backbone and head, grads cleared first."""
    backbone.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    last = backbone.forward_layers(images, [-1])[backbone.depth]
    head(last).pow(2).sum().backward()


def trainable_names(backbone) -> set[str]:
    return {name for name, p in backbone.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["salad", "cls"])
def test_frozen_backbone_gets_no_grads_but_the_head_does(tiny_backbone, kind):
    head = build_head(HeadSpec(kind=kind, **SMALL), num_channels=32)
    assert set_trainable(tiny_backbone, "frozen") == 0
    backward_through(tiny_backbone, head)
    assert all(p.grad is None for p in tiny_backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_last_n_trains_only_the_last_blocks_and_the_final_norm(tiny_backbone):
    head = build_head(HeadSpec(**SMALL), num_channels=32)
    count = set_trainable(tiny_backbone, "last_n", n=1)
    expected = {f"blocks.1.{name}" for name, _ in tiny_backbone.blocks[1].named_parameters()}
    expected |= {"norm.weight", "norm.bias"}
    assert trainable_names(tiny_backbone) == expected
    assert count == sum(p.numel() for name, p in tiny_backbone.named_parameters() if name in expected)
    backward_through(tiny_backbone, head)
    for name, p in tiny_backbone.named_parameters():
        if name in expected:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name  # patch/pos embed, cls token, block 0
    assert head.dustbin.grad is not None


def test_full_trains_everything_and_modes_can_be_switched_back(tiny_backbone):
    total = sum(p.numel() for p in tiny_backbone.parameters())
    assert set_trainable(tiny_backbone, "full") == total
    backward_through(tiny_backbone, ClsHead(32))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_backbone.parameters())
    assert set_trainable(tiny_backbone, "last_n", n=2) == total - sum(
        p.numel() for name, p in tiny_backbone.named_parameters() if not name.startswith(("blocks.", "norm."))
    )
    assert set_trainable(tiny_backbone, "frozen") == 0


@pytest.mark.parametrize("mode,n", [("partial", 1), ("last_n", 0), ("last_n", 3)])
def test_bad_modes_are_one_line_errors(tiny_backbone, mode, n):
    with pytest.raises(InputError):
        set_trainable(tiny_backbone, mode, n)
