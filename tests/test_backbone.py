"""DinoV2 backbone: any input size, per-layer tokens, early stop, position-embedding resize, registers.

All on the 2-block, 32-wide random ViT/14 (``dinov2_tiny_test``, native grid 4x4 = 56 px).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cvgl.models.backbone import PATCH, DinoV2, arch_kwargs, build_backbone


@pytest.fixture(scope="module")
def model() -> DinoV2:
    torch.manual_seed(0)
    m = build_backbone("dinov2_tiny_test")
    # Random init leaves the position embedding tiny (trunc-normal 0.02) and the class token 1e-6;
    # make them large so that a wrong or missing resize shows in every comparison below.
    with torch.no_grad():
        m.pos_embed.normal_()
        m.cls_token.normal_()
    return m


@pytest.fixture(scope="module")
def reg_model() -> DinoV2:
    torch.manual_seed(1)
    m = DinoV2(**{**arch_kwargs("dinov2_tiny_test"), "reg_tokens": 4, "no_embed_class": True})
    with torch.no_grad():
        m.pos_embed.normal_()
        m.cls_token.normal_()
        m.reg_token.normal_()
    return m.eval()


def reference_pos_embed(pos_grid: torch.Tensor, native: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Plain DINOv2-style resize: the ``[1, gh*gw, C]`` grid -> ``[1, h*w, C]`` (bicubic, no antialias)."""
    gh, gw = native
    dim = pos_grid.shape[-1]
    grid = pos_grid.reshape(1, gh, gw, dim).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=size, mode="bicubic", align_corners=False, antialias=False)
    return out.permute(0, 2, 3, 1).reshape(1, size[0] * size[1], dim)


# ------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("size", [(56, 56), (42, 98), (28, 154), (14, 14)])
@pytest.mark.parametrize("layers", [[-1], [1], [1, 2]])
def test_dynamic_input_sizes_give_patch_maps(model: DinoV2, size: tuple[int, int], layers: list[int]) -> None:
    images = torch.randn(3, 3, *size)
    with torch.no_grad():
        out = model.forward_layers(images, layers)
    assert sorted(out) == sorted({model.resolve_layer(layer) for layer in layers})
    for tokens in out.values():
        assert tokens.patches.shape == (3, 32, size[0] // PATCH, size[1] // PATCH)
        assert tokens.cls.shape == (3, 32)
        assert torch.isfinite(tokens.patches).all()


@pytest.mark.parametrize("size", [(56, 50), (55, 56), (13, 14)])
def test_size_not_multiple_of_patch_is_refused(model: DinoV2, size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="multiple of 14"):
        model.forward_layers(torch.zeros(1, 3, *size), [-1])


@pytest.mark.parametrize("size", [(56, 56), (42, 98), (28, 154)])
def test_last_layer_equals_forward_features(model: DinoV2, size: tuple[int, int]) -> None:
    """The per-layer path (early stop, own token split) against the plain full forward."""
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        full = model.forward_features(images)  # [B, 1 + N, C], after the final norm
        tokens = model.forward_layers(images, [-1])[2]
    h, w = size[0] // PATCH, size[1] // PATCH
    assert full.shape == (2, 1 + h * w, 32)
    torch.testing.assert_close(tokens.cls, full[:, 0])
    torch.testing.assert_close(tokens.patches.flatten(2).transpose(1, 2), full[:, 1:])
    # row-major patch order: token (r, c) is patch r * w + c
    torch.testing.assert_close(tokens.patches[:, :, 1, 2], full[:, 1 + 1 * w + 2])


def test_intermediate_layer_equals_manual_block_loop(model: DinoV2) -> None:
    images = torch.randn(2, 3, 42, 98)
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        after_1 = model.blocks[0](x)
        raw = model.forward_layers(images, [1], norm=False)[1]
        normed = model.forward_layers(images, [1], norm=True)[1]
    torch.testing.assert_close(raw.cls, after_1[:, 0])
    torch.testing.assert_close(raw.patches.flatten(2).transpose(1, 2), after_1[:, 1:])
    torch.testing.assert_close(normed.cls, model.norm(after_1)[:, 0])


# ------------------------------------------------------------------------------ early stop


def _count_calls(module: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls: list[int] = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_forward_layers_stops_after_deepest_requested_block(model: DinoV2) -> None:
    calls_1, h1 = _count_calls(model.blocks[0])
    calls_2, h2 = _count_calls(model.blocks[1])
    calls_norm, h3 = _count_calls(model.norm)
    try:
        with torch.no_grad():
            out = model.forward_layers(torch.randn(1, 3, 56, 56), [1])
        assert list(out) == [1]
        assert (len(calls_1), len(calls_2)) == (1, 0)
        assert len(calls_norm) == 1  # only the requested layer's tokens are normalised

        with torch.no_grad():
            model.forward_layers(torch.randn(1, 3, 56, 56), [-1, 1])
        assert (len(calls_1), len(calls_2)) == (2, 1)
    finally:
        for handle in (h1, h2, h3):
            handle.remove()


# ------------------------------------------------------------------------------ layer numbers


@pytest.mark.parametrize("layer, expected", [(1, 1), (2, 2), (-1, 2), (-2, 1)])
def test_resolve_layer(model: DinoV2, layer: int, expected: int) -> None:
    assert model.resolve_layer(layer) == expected


@pytest.mark.parametrize("layer", [0, 3, -3, 100, -100])
def test_resolve_layer_out_of_range(model: DinoV2, layer: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        model.resolve_layer(layer)


def test_resolve_layer_on_twelve_blocks() -> None:
    m = DinoV2(**{**arch_kwargs("dinov2_tiny_test"), "depth": 12})
    assert [m.resolve_layer(i) for i in (-1, -4, -12, 8)] == [12, 9, 1, 8]


# ------------------------------------------------------------------------------ position embedding


@pytest.mark.parametrize("grid", [(3, 7), (2, 11), (6, 6), (1, 1), (5, 4)])
def test_pos_embed_resize_matches_reference(model: DinoV2, grid: tuple[int, int]) -> None:
    h, w = grid
    x = torch.randn(2, h, w, 32)
    with torch.no_grad():
        out = model._pos_embed(x)
        expected_pos = reference_pos_embed(model.pos_embed[:, 1:], (4, 4), grid)
    assert out.shape == (2, 1 + h * w, 32)
    torch.testing.assert_close(out[:, 1:], x.reshape(2, h * w, 32) + expected_pos, rtol=1e-6, atol=1e-6)
    # the class token keeps its own (never resized) position
    torch.testing.assert_close(out[:, 0], (model.cls_token + model.pos_embed[:, :1])[:, 0].expand(2, -1))
    # not a no-op: the resized grid is not just the native one cut/padded
    assert not torch.allclose(expected_pos[:, : min(16, h * w)], model.pos_embed[:, 1 : 1 + min(16, h * w)])


def test_pos_embed_is_identity_at_native_grid(model: DinoV2) -> None:
    x = torch.randn(2, 4, 4, 32)
    with torch.no_grad():
        out = model._pos_embed(x)
    assert torch.equal(out[:, 1:], x.reshape(2, 16, 32) + model.pos_embed[:, 1:])
    assert torch.equal(out[:, 0], (model.cls_token + model.pos_embed[:, :1])[:, 0].expand(2, -1))


def test_pos_embed_reference_is_identity_at_native_grid(model: DinoV2) -> None:
    """Sanity of the reference itself: bicubic to the same size returns the grid unchanged."""
    pos = model.pos_embed[:, 1:].detach()
    torch.testing.assert_close(reference_pos_embed(pos, (4, 4), (4, 4)), pos)


# ------------------------------------------------------------------------------ registers


def test_register_tokens_are_not_patches(reg_model: DinoV2) -> None:
    assert reg_model.num_prefix_tokens == 5
    assert reg_model.pos_embed.shape == (1, 16, 32)  # no_embed_class: positions for patches only
    images = torch.randn(2, 3, 42, 98)
    with torch.no_grad():
        full = reg_model.forward_features(images)
        tokens = reg_model.forward_layers(images, [-1])[2]
    assert full.shape == (2, 1 + 4 + 21, 32)
    assert tokens.patches.shape == (2, 32, 3, 7)
    torch.testing.assert_close(tokens.cls, full[:, 0])
    torch.testing.assert_close(tokens.patches.flatten(2).transpose(1, 2), full[:, 5:])


def test_register_pos_embed_layout(reg_model: DinoV2) -> None:
    """Class and register tokens get no position; patches get the resized grid."""
    x = torch.randn(2, 3, 7, 32)
    with torch.no_grad():
        out = reg_model._pos_embed(x)
        expected_pos = reference_pos_embed(reg_model.pos_embed, (4, 4), (3, 7))
    assert out.shape == (2, 5 + 21, 32)
    assert torch.equal(out[:, 0], reg_model.cls_token[:, 0].expand(2, -1))
    assert torch.equal(out[:, 1:5], reg_model.reg_token.expand(2, -1, -1))
    torch.testing.assert_close(out[:, 5:], x.reshape(2, 21, 32) + expected_pos, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        native = reg_model._pos_embed(torch.zeros(1, 4, 4, 32))
    assert torch.equal(native[:, 5:], reg_model.pos_embed)


def test_build_backbone_keeps_checkpoint_grid() -> None:
    """A checkpoint with another native grid is loaded as-is (model rebuilt), not resampled."""
    torch.manual_seed(2)
    source = DinoV2(**{**arch_kwargs("dinov2_tiny_test"), "img_size": 98})  # 7x7 grid
    state = source.state_dict()
    loaded = build_backbone("dinov2_tiny_test", state)
    assert loaded.patch_embed.grid_size == (7, 7)
    assert torch.equal(loaded.pos_embed, state["pos_embed"])
    images = torch.randn(1, 3, 42, 98)
    with torch.no_grad():
        a = source.eval().forward_layers(images, [-1])[2].patches
        b = loaded.forward_layers(images, [-1])[2].patches
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------ timm, the reference


def _timm_reference(kwargs: dict):
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    kwargs = dict(kwargs)
    if kwargs.pop("swiglu", False):
        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
    return VisionTransformer(num_classes=0, dynamic_img_size=True, **kwargs).eval()


@pytest.mark.parametrize("extra", [{}, {"reg_tokens": 4, "no_embed_class": True}, {"mlp_ratio": 2.66667 * 2, "swiglu": True}],
                         ids=["plain", "registers", "swiglu"])
def test_forward_equals_timm_vision_transformer(extra: dict) -> None:
    """Our module on a timm ``VisionTransformer``'s weights: the same parameter names and the same
    tokens, at the native grid (timm's own position resize) and at another size (ours, through
    timm's blocks and norm)."""
    torch.manual_seed(3)
    kwargs = {**arch_kwargs("dinov2_tiny_test"), **extra}
    reference = _timm_reference(kwargs)
    with torch.no_grad():  # the random init leaves positions and tokens tiny: make them count
        for name in ("pos_embed", "cls_token", "reg_token"):
            if getattr(reference, name, None) is not None:
                getattr(reference, name).normal_()
    state = reference.state_dict()
    ours = DinoV2(**kwargs).eval()
    ours.load_state_dict(state)
    assert list(ours.state_dict()) == list(state)
    images = torch.randn(2, 3, 56, 56)
    other = torch.randn(2, 3, 42, 98)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(images), reference.forward_features(images), rtol=0, atol=1e-6)
        expected = reference.norm(reference.blocks(ours._pos_embed(reference.patch_embed(other))))
        torch.testing.assert_close(ours.forward_features(other), expected, rtol=0, atol=1e-6)


def test_building_an_encoder_imports_neither_timm_nor_torchvision() -> None:
    """Both cost seconds on every command's start, and the encoder needs neither."""
    code = ("import sys; from cvgl.models.factory import create_encoder; import cvgl.cli; "
            "create_encoder('gem', 'random:dinov2_tiny_test', (56, 56)); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('timm', 'torchvision')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
