"""How the encoder computes (cvgl.models.runtime): precision, runtime, weight loading, batching.

Every optimised path is compared with a plain reference written out here: the eager float32
forward on ``torch.stack`` of per-image tensors, and timm's ``DinoV2(...)`` + ``load_state_dict``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cvgl.errors import CvglError, WeightsError
from cvgl.models import runtime
from cvgl.models.backbone import DinoV2, arch_kwargs, build_backbone
from cvgl.models.factory import EncoderRecipe, create_encoder
from cvgl.models.runtime import (
    RuntimeUnavailableError,
    check_request,
    configure,
    cpu_flags,
    decide,
    export_key,
    has_native_bf16,
    resolve_precision,
)
from cvgl.models.weights import cache_dir

TINY = "random:dinov2_tiny_test"
SIZE = (56, 56)
HAS_OPENVINO = runtime.openvino_available()


def _tiny(seed: int = 0, **settings):
    torch.manual_seed(seed)
    return create_encoder("gem", TINY, SIZE, **settings)


def _images(count: int, seed: int = 0) -> list:
    """Mixed inputs as callers pass them: uint8 arrays at the input size, larger PIL images that
    need the bicubic resize, RGBA and grey arrays."""
    rng = np.random.default_rng(seed)
    out: list = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            out.append(rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8))
        elif kind == 1:
            out.append(Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)))
        elif kind == 2:
            out.append(rng.integers(0, 256, (60, 60, 4), dtype=np.uint8))
        else:
            out.append(rng.integers(0, 256, SIZE, dtype=np.uint8))
    return out


def _reference_forward(encoder, batch: torch.Tensor) -> torch.Tensor:
    """The plain eager float32 forward, written out: normalise, backbone layers, head."""
    x = (batch - encoder.mean) / encoder.std
    layers = {spec: encoder.backbone.resolve_layer(spec) for spec in encoder.head.layers}
    tokens = encoder.backbone.forward_layers(x, sorted(set(layers.values())), norm=encoder.head.final_norm)
    return encoder.head({spec: tokens[layer] for spec, layer in layers.items()})


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ----------------------------------------------------------------------------------------------
# Weights: the meta-device build equals the plain build
# ----------------------------------------------------------------------------------------------


def test_meta_device_build_equals_plain_build_bit_for_bit() -> None:
    torch.manual_seed(3)
    source = DinoV2(**arch_kwargs("dinov2_tiny_test"))
    # A checkpoint as converters hand it over: half precision, one tensor non-contiguous.
    state = {k: v.half() for k, v in source.state_dict().items()}
    state["blocks.0.mlp.fc1.weight"] = state["blocks.0.mlp.fc1.weight"].t().contiguous().t()
    plain = DinoV2(**arch_kwargs("dinov2_tiny_test"))
    plain.load_state_dict(state)
    plain.eval()
    built = build_backbone("dinov2_tiny_test", state)
    ours, theirs = dict(built.state_dict()), dict(plain.state_dict())
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and ours[name].is_contiguous(), name
        assert torch.equal(ours[name], tensor), name
    assert all(p.requires_grad for p in built.parameters())  # still trainable
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = plain.forward_layers(images, [1, 2])
        b = built.forward_layers(images, [1, 2])
    for layer in (1, 2):
        assert torch.equal(a[layer].cls, b[layer].cls) and torch.equal(a[layer].patches, b[layer].patches)
    state["pos_embed"].zero_()  # the model owns its tensors: the caller's checkpoint is not aliased
    assert built.pos_embed.abs().sum() > 0


def test_meta_device_build_refuses_missing_and_unexpected_weights() -> None:
    state = DinoV2(**arch_kwargs("dinov2_tiny_test")).state_dict()
    missing = {k: v for k, v in state.items() if k != "norm.weight"}
    with pytest.raises(WeightsError, match="missing"):
        build_backbone("dinov2_tiny_test", missing)
    with pytest.raises(WeightsError, match="unexpected"):
        build_backbone("dinov2_tiny_test", {**state, "extra.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------------------------
# fp32: the batched path is the reference, bit for bit
# ----------------------------------------------------------------------------------------------


def test_batch_tensor_equals_stacked_to_tensor() -> None:
    encoder = _tiny()
    images = _images(8)
    batch = encoder.batch_tensor(images)
    assert batch.is_contiguous() and batch.dtype == torch.float32
    assert torch.equal(batch, torch.stack([encoder.to_tensor(image) for image in images]))


def test_fp32_encode_is_bit_identical_to_the_plain_reference() -> None:
    encoder = _tiny()
    assert encoder.describe() == "fp32 on torch"
    images = _images(7, seed=1)
    got = encoder.encode(images, batch_size=3)
    with torch.inference_mode():
        parts = [_reference_forward(encoder, torch.stack([encoder.to_tensor(i) for i in images[s:s + 3]]))
                 for s in range(0, len(images), 3)]
    expected = torch.cat(parts).numpy()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


# ----------------------------------------------------------------------------------------------
# bf16: backbone only, descriptors interchangeable with fp32
# ----------------------------------------------------------------------------------------------


def test_bf16_casts_the_backbone_only_and_stays_close_to_fp32() -> None:
    fp32, bf16 = _tiny(), _tiny(precision="bf16")
    assert fp32.identity == bf16.identity  # precision is not part of what a descriptor is
    assert bf16.describe() == "bf16 on torch"
    assert {p.dtype for p in bf16.backbone.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.head.parameters()} <= {torch.float32}
    assert bf16.mean.dtype == bf16.std.dtype == torch.float32
    images = _images(8, seed=2)
    a, b = fp32.encode(images), bf16.encode(images)
    assert b.dtype == np.float32 and b.shape == a.shape
    assert _cosines(a, b).min() > 0.99  # tiny random ViT: the real weights are tested below


@pytest.mark.real
def test_bf16_descriptors_match_fp32_on_real_tiles() -> None:
    """Real weights, real imagery: WV2 tiles (queries) against the co-registered WV3 tiles."""
    from cvgl.bench.throughput import real_tile_pairs

    tiles, queries = real_tile_pairs(16)
    fp32 = create_encoder("gem-l8", "embedded")
    bf16 = create_encoder("gem-l8", "embedded", precision="bf16")
    ref32, ref16 = fp32.encode(tiles), bf16.encode(tiles)
    q32, q16 = fp32.encode(queries), bf16.encode(queries)
    assert _cosines(ref32, ref16).min() >= 0.9999
    assert _cosines(q32, q16).min() >= 0.9999
    # bf16 queries against an fp32 index (and the other way round) rank the same top-1 tile.
    top1 = (q32 @ ref32.T).argmax(1)
    assert np.array_equal((q16 @ ref32.T).argmax(1), top1)
    assert np.array_equal((q32 @ ref16.T).argmax(1), top1)


# ----------------------------------------------------------------------------------------------
# auto precision: from the CPU's flags
# ----------------------------------------------------------------------------------------------


CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: Test CPU\nflags\t\t: fpu sse avx2 {extra}\n"


@pytest.mark.parametrize(("extra", "native"), [
    ("avx512f avx512_bf16", True),  # AVX512_BF16 dot products (Zen 4+, Cooper Lake+)
    ("amx_tile amx_bf16 avx512f", True),  # AMX (Sapphire Rapids+)
    ("avx512f avx512_vnni", False),  # bf16 only emulated: fp32 is faster and exact
    ("", False),
])
def test_auto_precision_follows_native_bf16_flags(extra: str, native: bool) -> None:
    flags = cpu_flags(CPUINFO.format(extra=extra))
    assert "avx2" in flags
    assert has_native_bf16(flags) is native
    assert resolve_precision("auto", "cpu", flags) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", "cpu", flags) == "fp32"
    assert resolve_precision("bf16", "cpu", flags) == "bf16"  # asked for explicitly: honoured
    assert runtime.cpu_name(CPUINFO.format(extra=extra)) == "Test CPU"


def test_unknown_names_and_unavailable_runtimes_are_one_line_errors(monkeypatch) -> None:
    for precision, name, device, fragment in [
        ("fp16", "torch", "cpu", "precision 'fp16'"),
        ("fp32", "tensorrt", "cpu", "runtime 'tensorrt'"),
        ("fp32", "openvino", "cuda", "runs on the CPU"),
    ]:
        with pytest.raises(RuntimeUnavailableError, match=fragment) as info:
            check_request(precision, name, device)
        assert "\n" not in str(info.value) and isinstance(info.value, CvglError)
    monkeypatch.setattr(runtime, "openvino_available", lambda: False)
    monkeypatch.setattr("cvgl.models.factory.load_weights", lambda *_: pytest.fail("weights loaded before the check"))
    with pytest.raises(RuntimeUnavailableError) as info:
        create_encoder("gem-l8", "embedded", runtime="openvino")
    assert str(info.value).startswith("runtime 'openvino': not installed;")
    assert "pip install 'cvgl[openvino]'" in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# auto runtime: deterministic, measured once, recorded
# ----------------------------------------------------------------------------------------------


def test_decide_needs_a_clear_margin() -> None:
    assert decide({"torch": 1.0, "openvino": 0.5}) == "openvino"
    assert decide({"torch": 1.0, "openvino": 0.95}) == "torch"  # within the margin: the reference
    assert decide({"torch": 1.0, "openvino": 1.5}) == "torch"


def test_auto_runtime_without_openvino_is_torch_and_records_nothing(monkeypatch) -> None:
    monkeypatch.setattr(runtime, "openvino_available", lambda: False)
    encoder = _tiny(runtime="auto", precision="auto")
    assert encoder.runtime == "torch" and encoder._runner is None
    assert encoder.precision == resolve_precision("auto")
    assert not (cache_dir() / runtime.CHOICE_FILE).exists()


def test_export_key_separates_views_and_sizes() -> None:
    a, b = _tiny(), _tiny()
    assert export_key(a) == export_key(b)
    b.head.view = "query"  # a trained model's two views share one identity
    assert export_key(a) != export_key(b)
    torch.manual_seed(0)
    other_size = create_encoder("gem", TINY, (70, 70))
    assert export_key(a) != export_key(other_size)


def test_recipe_carries_precision_and_runtime() -> None:
    torch.manual_seed(0)
    recipe = EncoderRecipe.capture("gem", TINY, SIZE, precision="bf16", runtime="torch")
    built = recipe.build()
    assert built.describe() == "bf16 on torch"
    assert built.identity == _tiny().identity


@pytest.mark.skipif(not HAS_OPENVINO, reason="the openvino extra is not installed")
class TestOpenVino:
    """The OpenVINO runtime on the tiny encoder (export, parity, cache, the recorded auto choice)."""

    def test_openvino_matches_torch_and_exports_once(self) -> None:
        reference = _tiny()
        encoder = _tiny(runtime="openvino")
        assert encoder.describe() == "fp32 on openvino"
        onnx = runtime.onnx_path(encoder)
        assert onnx.is_file()
        stamp = onnx.stat().st_mtime_ns
        images = _images(5, seed=4)
        np.testing.assert_allclose(encoder.encode(images), reference.encode(images), atol=runtime.EXPORT_TOLERANCE)
        # Another input size than the export's runs eager torch (same descriptor function).
        odd = torch.rand(1, 3, 70, 70)
        with torch.inference_mode():
            torch.testing.assert_close(encoder(odd), reference(odd))
        again = _tiny(precision="bf16", runtime="openvino")
        assert again.describe() == "bf16 on openvino"
        assert onnx.stat().st_mtime_ns == stamp  # cached: not exported again
        assert _cosines(again.encode(images), reference.encode(images)).min() > 0.99

    def test_openvino_computes_the_tokens_and_torch_the_head(self, monkeypatch) -> None:
        """OpenVINO's precision hint covers its whole graph: the graph ends at the head's layer
        tokens, so a bf16 request leaves the pooling head float32 as it is on torch."""
        encoder = _tiny(runtime="openvino")
        runner = encoder._runner
        assert len(runner._model.outputs) == 2 * len(encoder.head.layers)
        calls = []
        original = type(encoder.head).forward
        monkeypatch.setattr(type(encoder.head), "forward", lambda head, tokens: calls.append(
            {k: (v.cls.dtype, v.patches.dtype) for k, v in tokens.items()}) or original(head, tokens))
        encoder.encode(_images(2))
        assert calls and all(d == (torch.float32, torch.float32) for c in calls for d in c.values())

    def test_auto_runtime_measures_once_then_reads_the_record(self, monkeypatch) -> None:
        path = cache_dir() / runtime.CHOICE_FILE
        path.unlink(missing_ok=True)
        first = _tiny(runtime="auto")
        records = json.loads(path.read_text())
        assert len(records) == 1
        record = next(iter(records.values()))
        assert record["runtime"] in ("torch", "openvino") and record["runtime"] == first.runtime
        assert record["torch_s"] > 0 and record["openvino_s"] > 0 and record["cpu"]
        monkeypatch.setattr(runtime, "measure_runtimes", lambda *_: pytest.fail("measured twice"))
        for _ in range(2):
            assert _tiny(runtime="auto").runtime == first.runtime
        # A recorded 'torch' skips OpenVINO entirely (no export, no compile).
        records[next(iter(records))]["runtime"] = "torch"
        path.write_text(json.dumps(records))
        monkeypatch.setattr(runtime, "cached_onnx", lambda *_: pytest.fail("exported although torch was recorded"))
        assert _tiny(runtime="auto").runtime == "torch"


def test_configure_is_idempotent_on_the_reference_settings() -> None:
    encoder = _tiny()
    before = encoder.encode(_images(3))
    configure(encoder, "fp32", "torch")
    np.testing.assert_array_equal(encoder.encode(_images(3)), before)
